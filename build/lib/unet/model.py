"""The U-Net of Ronneberger et al. (2015), built from small named parts, and its tiling geometry.

With ``padding="valid"`` (the paper's) every 3x3 convolution trims one pixel per side, so an output
pixel depends only on a fixed window of input around it: ``halo`` pixels on every side. That is what
makes overlap-tile inference exact. The model also knows which input sizes are valid (every feature map
must be even before each 2x2 pooling) and the alignment ``2**depth`` its tile origins must sit on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

Padding = Literal["valid", "same"]
UpMode = Literal["transpose", "bilinear"]


@dataclass
class ModelCard:
    """What a model carries besides its weights, declared (not glued on): class names, the µm/px of the images
    it was trained on, the sha256 of the artifact it was loaded from, free metadata. Filled by
    ``unet.load_model``; a model built in code has an empty card."""

    class_names: list[str] | None = None
    mpp: float | None = None
    checksum: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net; everything needed to rebuild it from a saved artifact."""

    in_channels: int = 3
    num_classes: int = 2
    base_channels: int = 64
    depth: int = 4
    padding: Padding = "valid"
    batch_norm: bool = False
    up_mode: UpMode = "transpose"
    # Per-channel normalisation applied inside the model to inputs in [0, 1].
    input_mean: tuple[float, ...] = field(default=(0.5,))
    input_std: tuple[float, ...] = field(default=(0.5,))
    # For "same" models the halo is measured; a user may set it explicitly instead.
    halo_override: int | None = None

    def __post_init__(self) -> None:
        if self.padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {self.padding!r}")
        if self.up_mode not in ("transpose", "bilinear"):
            raise ValueError(f"up_mode must be 'transpose' or 'bilinear', got {self.up_mode!r}")
        if self.depth < 1 or self.base_channels < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("depth, base_channels, in_channels and num_classes must all be >= 1")
        for name in ("input_mean", "input_std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) not in (1, self.in_channels):
                raise ValueError(f"{name} needs 1 or {self.in_channels} values, got {len(value)}")
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return asdict(self)


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by (optional batch norm and) ReLU."""

    def __init__(self, in_ch: int, out_ch: int, padding: int, batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for ch_in in (in_ch, out_ch):
            layers.append(nn.Conv2d(ch_in, out_ch, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out_ch))
            layers.append(nn.ReLU(inplace=True))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Down(nn.Module):
    """2x2 max-pooling then a double convolution that doubles the channels."""

    def __init__(self, in_ch: int, out_ch: int, padding: int, batch_norm: bool):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = DoubleConv(in_ch, out_ch, padding, batch_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The paper's "copy and crop": the centre ``height x width`` of a skip feature map."""
    top = (x.shape[-2] - height) // 2
    left = (x.shape[-1] - width) // 2
    return x[..., top : top + height, left : left + width]


class Up(nn.Module):
    """2x up-sampling that halves the channels, concatenation with the cropped skip, double convolution."""

    def __init__(self, in_ch: int, out_ch: int, padding: int, batch_norm: bool, up_mode: UpMode):
        super().__init__()
        # Bilinear interpolation clamps at the map's border (an implicit padding): a valid network
        # drops that pixel on each side so every remaining value is independent of where a tile starts.
        self.trim = 1 if (up_mode == "bilinear" and padding == 0) else 0
        if up_mode == "transpose":
            self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_ch, out_ch, 1),
            )
        self.conv = DoubleConv(2 * out_ch, out_ch, padding, batch_norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if self.trim:
            x = x[..., self.trim : -self.trim, self.trim : -self.trim]
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """U-Net taking N x C x H x W float32 in [0, 1] and returning N x classes x H' x W' logits.

    Geometry (all sizes are per spatial axis):
      * ``halo``: context pixels each output pixel needs on every side;
      * ``alignment``: ``2**depth``, the grid tile origins must lie on for shift-equivariance;
      * ``output_size(n)`` / ``input_size_for(n)``: between valid input and output sizes.
    """

    def __init__(self, config: UNetConfig | None = None, **kwargs):
        super().__init__()
        if config is None:
            config = UNetConfig(**kwargs)
        elif kwargs:
            raise TypeError("pass either a UNetConfig or keyword arguments, not both")
        self.config = config
        self.card = ModelCard()
        self._smallest_input: int | None = None
        pad = 0 if config.padding == "valid" else 1
        ch = [config.base_channels * 2**i for i in range(config.depth + 1)]
        self.register_buffer("input_mean", _channel_buffer(config.input_mean, config.in_channels))
        self.register_buffer("input_std", _channel_buffer(config.input_std, config.in_channels))
        self.inc = DoubleConv(config.in_channels, ch[0], pad, config.batch_norm)
        self.downs = nn.ModuleList(Down(ch[i], ch[i + 1], pad, config.batch_norm) for i in range(config.depth))
        self.ups = nn.ModuleList(
            Up(ch[i + 1], ch[i], pad, config.batch_norm, config.up_mode) for i in reversed(range(config.depth))
        )
        self.outc = nn.Conv2d(ch[0], config.num_classes, 1)
        self._measured_halo: int | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He (Kaiming) normal initialisation, as in the paper (std = sqrt(2 / fan_in))."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.outc(x)

    # ------------------------------------------------------------------ geometry
    @property
    def depth(self) -> int:
        return self.config.depth

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def alignment(self) -> int:
        """Tile origins must be multiples of this for the network to be shift-equivariant."""
        return 2**self.config.depth

    @property
    def is_valid_padding(self) -> bool:
        return self.config.padding == "valid"

    @property
    def halo(self) -> int:
        """Context pixels needed on each side of an output pixel.

        Valid padding: exact, (input - output) / 2 for any valid size (92 for the paper's depth 4).
        Same padding: the measured receptive radius (impulse response), unless ``halo_override`` is set.
        """
        if self.config.halo_override is not None:
            return int(self.config.halo_override)
        if self.is_valid_padding:
            smallest = self._smallest_valid_input()
            return (smallest - self.output_size(smallest)) // 2
        if self._measured_halo is None:
            from unet.receptive_field import measure_halo

            self._measured_halo = measure_halo(self)
        return self._measured_halo

    def output_size(self, input_size: int) -> int:
        """Output side for a given input side; ValueError if the input size is not valid."""
        if not self.is_valid_padding:
            if input_size % self.alignment:
                raise ValueError(f"input size {input_size} must be a multiple of {self.alignment}")
            return input_size
        size = input_size - 4
        for _ in range(self.config.depth):
            if size <= 0 or size % 2:
                raise ValueError(f"input size {input_size} is not valid: a feature map of size {size} before pooling")
            size = size // 2 - 4
        trim = 2 if self.config.up_mode == "bilinear" else 0
        for _ in range(self.config.depth):
            if size <= 0:
                break
            size = size * 2 - trim - 4
        if size <= 0:
            raise ValueError(f"input size {input_size} is too small for depth {self.config.depth}")
        return size

    def is_valid_input_size(self, input_size: int) -> bool:
        try:
            self.output_size(input_size)
        except ValueError:
            return False
        return True

    def valid_output_size(self, at_least: int) -> int:
        """The smallest valid output size >= ``at_least``."""
        if not self.is_valid_padding:
            return _round_up(max(at_least, 1), self.alignment)
        # Valid outputs form an arithmetic progression with step 2**depth.
        step = self.alignment
        first = self.output_size(self._smallest_valid_input())
        if at_least <= first:
            return first
        return first + _round_up(at_least - first, step)

    def input_size_for(self, output_size: int) -> int:
        """Input side that gives exactly ``output_size``; ValueError if that output size is not valid."""
        if not self.is_valid_padding:
            if output_size % self.alignment:
                raise ValueError(f"output size {output_size} must be a multiple of {self.alignment}")
            return output_size
        input_size = output_size + 2 * self.halo
        if not self.is_valid_input_size(input_size) or self.output_size(input_size) != output_size:
            raise ValueError(
                f"output size {output_size} is not valid for depth {self.depth}; "
                f"the nearest valid size is {self.valid_output_size(output_size)}"
            )
        return input_size

    def _smallest_valid_input(self) -> int:
        """Found once per model and kept on it (a ``functools.cache`` on the method would keep every model alive)."""
        if self._smallest_input is None:
            size = 1
            while not self.is_valid_input_size(size):
                size += 1
            self._smallest_input = size
        return self._smallest_input


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _channel_buffer(values: tuple[float, ...], channels: int) -> torch.Tensor:
    tensor = torch.tensor(values, dtype=torch.float32)
    if tensor.numel() == 1:
        tensor = tensor.repeat(channels)
    return tensor.view(1, channels, 1, 1)


def logits_to_labels(logits: torch.Tensor) -> torch.Tensor:
    """Class index per pixel as uint8 (classes are few; uint8 keeps the mosaic small)."""
    return logits.argmax(dim=1).to(torch.uint8)


def logits_to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return F.softmax(logits.float(), dim=1)
