"""The one tile function every executor uses: uint8 input windows in, cropped uint8 labels out.

The whole step runs on the device: uint8 -> float, normalise (inside the model), channels_last, autocast,
forward, softmax/argmax, valid-centre crop, cast to uint8; only the small label tile goes back.

Precision (``amp``) means the same on CPU and GPU: ``"auto"`` is bf16 where the device computes it natively
(CUDA; CPUs with AVX-512 BF16 or AMX, detected at run time) and float32 elsewhere; ``"off"`` is float32, the
exact mode (tiled equals the whole-image pass within float rounding); bf16 flips the argmax of near-ties only
(README "Performance", CPU modes). channels_last is the default layout everywhere: in float32 it gives the
same logits as NCHW on the CPU, and it is what oneDNN's and cuDNN's fast kernels want.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.slides.geometry import TileGrid
from pipeline.text import one_line

logger = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Output side one forward window aims at: 2 x 2 tiles of 256 (604^2 px in, batch 1) ran 1.17-1.25x faster per
# output pixel than 4 windows of 348^2 on this project's CPU, 3 x 3 (860^2) slower (docs/performance.md).
FORWARD_SIDE = 512


def default_forward_tiles(tile_size: int) -> int:
    """Tiles per side of one forward window: as many as fit in :data:`FORWARD_SIDE` (at least one)."""
    return max(1, FORWARD_SIDE // tile_size)


# ``--compile auto``: a CPU actor compiles once its work is known to reach this many tiles, about two minutes of eager
# bf16 forward passes on this project's 2-core CPU, against a compile of 3-4 s with inductor's on-disk cache warm
# (every job after the first on a machine) and ~24 s cold (docs/performance.md).
COMPILE_MIN_TILES = 8192


def resolve_compile(compile: bool | str, device: torch.device, tiles: int) -> bool | str:
    """``"auto"``: True on a CPU once ``tiles`` (the work known so far) reaches :data:`COMPILE_MIN_TILES`, else
    False (GPUs: not measured yet, so eager); anything else as given (True, False, a torch.compile mode)."""
    if compile != "auto":
        return compile
    return device.type == "cpu" and tiles >= COMPILE_MIN_TILES


def windows_per_batch(batch_size: int, tile_size: int, side: int) -> int:
    """Windows of output ``side`` in a batch of ``batch_size`` tiles' pixels (at least one): a batch of 4 tiles
    is 4 windows of one tile or 1 of 2 x 2, so the pixels per forward pass, and its memory, stay put."""
    return max(1, batch_size * tile_size**2 // side**2)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX-512 BF16 or AMX): there oneDNN's bf16 convolutions run
    ~3x float32; elsewhere bf16 is emulated and slower than float32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """``"auto"``: bf16 where ``device`` has it natively (CUDA, or a CPU with AVX-512 BF16/AMX), else float32;
    ``"bf16"``/``"fp16"``: that, whatever the device; ``None``/``"off"``: float32."""
    if amp in (None, "off", "fp32"):
        return None
    if amp == "auto":
        native = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return torch.bfloat16 if native else None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of auto, bf16, fp16, off; got {amp!r}")
    return AMP_DTYPES[amp]


@dataclass
class TilePredictor:
    """Holds the model on its device and turns a batch of input windows into label tiles.

    Build it once per process / actor (the model is moved and optionally compiled here), then call it
    per batch. ``batch_size`` (tiles per batch) matters only with ``compile``: batches are padded to it for
    static shapes, to one window of 2 x 2 tiles for every 4 tiles. A window may hold several tiles: its output
    side is its input side minus ``reach`` (the grid's, set by :meth:`for_grid`); ``forward_tiles``: tiles per
    side of the windows the shard path builds (None: :func:`default_forward_tiles`).
    ``compile``: True (CUDA graphs via mode "reduce-overhead" on CUDA, the default mode on CPU) or a
    torch.compile mode name. ``channels_last``: the input and weight layout (default True: the fast one for
    oneDNN and cuDNN; False: NCHW).
    ``busy_seconds`` adds up the time spent in calls: what the rest of a pipeline leaves the model.
    """

    model: torch.nn.Module
    tile_size: int
    crop: int
    device: str | torch.device = "auto"
    amp: str | None = None
    probabilities: bool = False
    compile: bool | str = False
    batch_size: int | None = None
    channels_last: bool = True
    reach: int | None = None
    forward_tiles: int | None = None
    _forward: object = field(init=False, repr=False)
    busy_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.device = resolve_device(self.device)
        if self.forward_tiles is None:
            self.forward_tiles = default_forward_tiles(self.tile_size)
        if int(self.forward_tiles) != self.forward_tiles or self.forward_tiles < 1:
            raise ValueError(f"forward_tiles must be a positive whole number, got {self.forward_tiles}")
        self.amp_dtype = resolve_amp(self.amp, self.device)
        self.model = self.model.to(self.device).eval()
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            if self.amp_dtype is None:  # float32 means float32: TF32 would keep 10 bits of each input's mantissa
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
        self._forward, self._eager_if_compile_fails = self._step, False
        if self.compile:
            self.start_compiling(self.compile)

    def start_compiling(self, compile: bool | str = True, eager_if_it_fails: bool = False) -> None:
        """Run the compiled step from the next call (``compile``: True or a torch.compile mode); each new window
        shape compiles at its first call. ``eager_if_it_fails``: when compiling fails (no C++ compiler on the
        machine, an op inductor cannot lower), log it and go on eagerly instead of failing the run."""
        if compile == "auto" or self.batch_size is None:
            raise ValueError("compiling needs compile=True or a torch.compile mode, and a fixed batch_size "
                             "(batches are padded to it)")  # fmt: skip
        mode = compile if isinstance(compile, str) else None
        options = None
        if compile is True and self.device.type == "cuda":
            mode = "reduce-overhead"
        elif compile is True:
            options = {"freezing": True}  # weights as constants, prepacked for oneDNN: inductor's CPU inference setting
        self.compile, self._eager_if_compile_fails = compile, eager_if_it_fails
        self._forward = torch.compile(self._step, mode=mode, options=options, dynamic=False)

    @classmethod
    def for_grid(cls, model: torch.nn.Module, grid: TileGrid, **options) -> "TilePredictor":
        return cls(model, tile_size=grid.tile_size, crop=grid.crop, reach=grid.reach, **options)

    def _step(self, windows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = windows.permute(0, 3, 1, 2).float().div_(255.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.model(x)
        c = self.crop
        t = self.tile_size if self.reach is None else windows.shape[1] - self.reach  # the window's output side
        logits = logits[:, :, c : c + t, c : c + t].float()
        labels = logits.argmax(dim=1).to(torch.uint8)
        if not self.probabilities:
            return labels, logits
        probs = torch.softmax(logits, dim=1).mul_(255.0).round_().to(torch.uint8)
        return labels, logits, probs

    @torch.inference_mode()
    def __call__(self, windows: np.ndarray, return_logits: bool = False) -> dict[str, np.ndarray]:
        """windows: (N, I, I, C) uint8 -> {"labels": (N, T, T) uint8[, "probabilities": (N, K, T, T)][, "logits"]},
        T = I - reach (the tile size when no reach is set)."""
        started, count = time.perf_counter(), len(windows)
        batch = torch.from_numpy(np.ascontiguousarray(windows))
        side = self.tile_size if self.reach is None else windows.shape[1] - self.reach
        pad_to = windows_per_batch(self.batch_size or 1, self.tile_size, side)
        if self.compile and count < pad_to:
            pad = torch.zeros((pad_to - count, *batch.shape[1:]), dtype=batch.dtype)
            batch = torch.cat([batch, pad])
        batch = batch.to(self.device, non_blocking=True)
        try:
            outputs = self._forward(batch)
        except Exception as error:
            if not (self.compile and self._eager_if_compile_fails):
                raise
            outputs = self._step(batch)  # an error of the step itself raises here again, compile kept
            logger.warning("torch.compile failed, running eagerly: %s", one_line(error))
            self._forward, self.compile = self._step, False
        result = {"labels": outputs[0][:count].cpu().numpy()}
        if self.probabilities:
            result["probabilities"] = outputs[2][:count].cpu().numpy()
        if return_logits:
            result["logits"] = outputs[1][:count].cpu().numpy()
        self.busy_seconds += time.perf_counter() - started  # the copies to the host waited for the device
        return result


def whole_image_logits(model: torch.nn.Module, image: np.ndarray, amp: str | None = None) -> np.ndarray:
    """Reference: one forward pass over the whole (H, W, C) uint8 image mirror-padded by the halo.

    The image is padded with np.pad(mode="symmetric") by ``halo`` on the top/left and up to the next
    valid input size on the bottom/right; the logits of the H x W slide are returned as (K, H, W) float32.
    Use it on small images to check tiled output (it holds the whole image in memory). ``amp``: as
    :class:`TilePredictor`'s (NCHW; the tiles' layout gives the same float32 logits).
    """
    image = image[..., None] if image.ndim == 2 else image
    height, width = image.shape[:2]
    halo = model.halo
    sizes = []
    for side in (height, width):
        if model.is_valid_padding:
            sizes.append(model.input_size_for(model.valid_output_size(side)))
        else:
            sizes.append(model.input_size_for(model.valid_output_size(side + 2 * halo)))
    padded = np.pad(image, ((halo, sizes[0] - height - halo), (halo, sizes[1] - width - halo), (0, 0)), mode="symmetric")
    crop = 0 if model.is_valid_padding else halo
    model = model.eval()
    device = next(model.parameters()).device
    amp_dtype = resolve_amp(amp, device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        x = torch.from_numpy(padded).permute(2, 0, 1)[None].float().div_(255.0).to(device)
        logits = model(x)[0, :, crop : crop + height, crop : crop + width]
    return logits.float().cpu().numpy()
