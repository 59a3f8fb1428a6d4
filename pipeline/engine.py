"""In-process overlap-tile engine: slide -> tiles -> U-Net -> valid centres -> OME-Zarr mosaic.

``segment_slide`` is the reference executor; the Ray job runs the very same pieces (``plan_slide``,
``TilePredictor``, ``OutputStore.write_tile``) on CPU workers and GPU actors.
"""

from __future__ import annotations

import logging
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipeline.geometry import Tile, TileGrid, tile_grid_for_model
from pipeline.predict import TilePredictor
from pipeline.resolution import open_for_segmentation
from pipeline.pyramid import open_slide
from pipeline.slide import SlideLimits, SlideSource
from pipeline.locking import StoreLock
from pipeline.store import (
    TILE_DONE, TILE_PENDING, TILE_SKIPPED, OutputStore, create_output_store, open_existing_store,
)  # fmt: skip

logger = logging.getLogger(__name__)


@dataclass
class SlidePlan:
    """Everything decided before the first tile runs: source, grid and the store's arrays."""

    slide: SlideSource
    grid: TileGrid
    store: OutputStore
    tiles: list[Tile]  # tiles still to run
    skipped: int  # tiles not run because they hold no tissue
    already_done: int  # tiles finished by an earlier (resumed) run
    complete: bool = False  # the store was already complete before this run: nothing to do, kept as it is

    def finalize(self) -> None:
        """Build the pyramid and mark the store complete; only once every tile is in (checked on disk)."""
        if not self.complete:
            self.store.finalize()

    def result(
        self, tiles_run: int, seconds: float, status: str = "complete", model_seconds: float = 0.0
    ) -> "SegmentResult":
        return SegmentResult(
            slide=self.slide.path or self.slide.name, output=self.store.path, shape=self.grid.shape,
            level=self.slide.level, mpp=self.slide.mpp, tiles_total=len(self.grid), tiles_run=tiles_run,
            tiles_skipped=self.skipped, seconds=seconds, status=status, tiles_done_earlier=self.already_done,
            kept=self.complete, model_seconds=model_seconds,
        )  # fmt: skip


@dataclass
class SegmentResult:
    """What one slide's run produced; ``status`` is "complete" or "failed: <reason>".

    ``tiles_done_earlier``: tiles an earlier run had finished (> 0: this run resumed it); ``kept``: the
    output was already complete, so this run left it as it was. ``model_seconds``: time in the model's
    forward passes; ``model_busy`` (its share of ``seconds``) says how well the pipeline fed the model."""

    slide: str
    output: str
    shape: tuple[int, int]
    level: int
    mpp: float | None
    tiles_total: int
    tiles_run: int
    tiles_skipped: int
    seconds: float
    status: str = "complete"
    tiles_done_earlier: int = 0
    kept: bool = False
    model_seconds: float = 0.0

    @property
    def resumed(self) -> bool:
        return self.tiles_done_earlier > 0

    @property
    def model_busy(self) -> float:
        return self.model_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def megapixels_per_second(self) -> float:
        return self.shape[0] * self.shape[1] / 1e6 / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "resumed": self.resumed, "mpx_per_s": round(self.megapixels_per_second, 4),
                "model_busy": round(self.model_busy, 4)}  # fmt: skip


def resolve_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    if isinstance(model, (str, Path)):
        from unet import load_model

        return load_model(model)
    return model


def provenance(slide: SlideSource, grid: TileGrid, model: torch.nn.Module, chunk: int, probabilities: bool,
               tissue: str = "none") -> dict:  # fmt: skip
    import dask
    import zarr

    import unet
    from unet.artifact import model_checksum

    return {
        "source": slide.path or slide.name,
        "level": slide.level,
        "shape": list(grid.shape),
        "mpp": slide.mpp,
        "level0_downsample": slide.level0_downsample,  # level-0 px per stored px (GeoJSON export)
        "pixels": slide.pixels,  # how they were read: a store resumed by a later version must read them alike
        "tile_size": grid.tile_size,
        "chunk": chunk,
        "halo": grid.halo,
        "input_size": grid.input_size,
        "probabilities": probabilities,
        "tissue": tissue,
        "model_config": model.config.to_dict(),
        "model_checksum": model_checksum(model),
        "class_names": class_names_of(model),
        "model_mpp": getattr(model, "mpp", None),
        "software": {
            "wsi-unet": getattr(unet, "__version__", "0.1.0"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "dask": dask.__version__,
        },
    }


def class_names_of(model: torch.nn.Module) -> list[str]:
    names = getattr(model, "class_names", None)
    return list(names) if names else ["background"] + [f"class_{i}" for i in range(1, model.num_classes)]


def plan_slide(
    source: Any,
    out_path: str | Path,
    model: torch.nn.Module,
    *,
    tile_size: int = 256,
    level: int | None = None,
    target_mpp: float | None = None,
    require_mpp: bool = False,
    chunk: int | None = None,
    mpp: float | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    tissue_mask: Any = None,
    replace_other_slides: bool = True,
    limits: SlideLimits | None = None,
) -> SlidePlan:
    """Open the slide, lay out the tiles and create (or reopen, with ``resume``) the output store.

    The caller holds the store's lock (:class:`pipeline.locking.StoreLock`). ``require_mpp``: a slide
    without µm/px metadata is an error for ``target_mpp`` instead of falling back to level 0.
    """
    slide = open_for_segmentation(source, level, target_mpp, mpp, require_mpp=require_mpp)
    in_channels = model.config.in_channels
    if slide.shape[2] != in_channels:
        raise ValueError(
            f"{slide.path or slide.name}: has {slide.shape[2]} channels but the model expects {in_channels}"
        )
    chunk = chunk or tile_size
    grid = tile_grid_for_model(model, slide.size, tile_size, chunk)
    (limits or SlideLimits()).check(slide.path or slide.name, slide.size, len(grid))  # before any per-tile work
    from pipeline.tissue_tiles import describe_tissue_option, slide_tissue_mask, split_tissue_tiles

    meta = provenance(slide, grid, model, chunk, probabilities, describe_tissue_option(tissue_mask))
    store = open_existing_store(out_path, grid, meta, overwrite=overwrite, resume=resume,
                                replace_other_slides=replace_other_slides)  # fmt: skip
    if store is None:
        mask, skipped = None, []
        if tissue_mask is not None:  # before the store exists: a failed read leaves nothing behind
            mask = slide_tissue_mask(slide, tissue_mask)
            _, skipped = split_tissue_tiles(grid, list(grid), mask)
        store = create_output_store(
            out_path, grid, chunk=chunk, class_names=class_names_of(model), mpp=slide.mpp, provenance=meta,
            probabilities=probabilities, tissue_mask=mask, skipped=skipped,
        )  # fmt: skip
    states = store.tile_states()
    pending = [tile for tile in grid if states[tile.row, tile.col] == TILE_PENDING]
    return SlidePlan(
        slide, grid, store, pending, skipped=int((states == TILE_SKIPPED).sum()),
        already_done=int((states == TILE_DONE).sum()), complete=store.status == "complete",
    )  # fmt: skip


def batched(items: list[Tile], size: int) -> Iterator[list[Tile]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def read_windows(slide: SlideSource, grid: TileGrid, tiles: Iterable[Tile]) -> np.ndarray:
    """(N, I, I, C) uint8 input windows for ``tiles``, mirrored at the slide border."""
    return np.stack([slide.read_window(*grid.input_origin(tile), grid.input_size) for tile in tiles])


def segment_slide(
    source: Any,
    out_path: str | Path,
    model: torch.nn.Module | str | Path,
    tile_size: int = 256,
    level: int | None = None,
    batch_size: int = 4,
    *,
    target_mpp: float | None = None,
    chunk: int | None = None,
    mpp: float | None = None,
    device: str = "auto",
    amp: str | None = None,
    probabilities: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    tissue_mask: Any = None,
    progress: bool = False,
) -> SegmentResult:
    """Segment one slide in-process and write the OME-Zarr mosaic to ``out_path``.

    ``source``: a slide path (OpenSlide formats, TIFF, Zarr) or an (H, W[, C]) uint8 array.
    ``model``: a :class:`unet.UNet` or the path of a saved artifact. ``tile_size``: output side per tile,
    a multiple of the model's alignment (``chunk``, the Zarr chunk, defaults to it). ``level``: the pyramid
    level (default 0), or ``target_mpp``: segment at that µm/px (best level, resampled if needed). ``amp``: None (float32),
    "bf16", "fp16" or "auto". Opt-in: ``resume`` (finish an interrupted store), ``tissue_mask`` (True to
    detect tissue, or a boolean mask image; tiles without tissue are not read and stay background).
    """
    started = time.perf_counter()
    model = resolve_model(model)
    with StoreLock(out_path) as lock:
        plan = plan_slide(
            source, out_path, model, tile_size=tile_size, level=level, target_mpp=target_mpp, chunk=chunk, mpp=mpp,
            probabilities=probabilities, overwrite=overwrite, resume=resume, tissue_mask=tissue_mask,
        )  # fmt: skip
        plan.store.lock_token = lock.token
        busy = run_tiles(
            plan, model, batch_size, device=device, amp=amp, probabilities=probabilities, progress=progress
        )
        plan.finalize()
    result = plan.result(len(plan.tiles), time.perf_counter() - started, model_seconds=busy)
    logger.info("%s: %d tiles in %.1f s -> %s", result.slide, result.tiles_run, result.seconds, out_path)
    return result


def run_tiles(plan: SlidePlan, model: torch.nn.Module, batch_size: int, *, device: str = "auto",
              amp: str | None = None, probabilities: bool = False, progress: bool = False) -> float:  # fmt: skip
    """Read, predict and write every pending tile of ``plan`` in this process (reads one batch ahead);
    returns the seconds spent in the model."""
    predictor = TilePredictor.for_grid(model, plan.grid, device=device, amp=amp, probabilities=probabilities)
    bar = _progress_bar(plan, progress)
    batches = list(batched(plan.tiles, batch_size))
    with ThreadPoolExecutor(max_workers=1) as reader:  # read the next batch while this one runs
        upcoming = reader.submit(read_windows, plan.slide, plan.grid, batches[0]) if batches else None
        for index, tiles in enumerate(batches):
            windows = upcoming.result()
            if index + 1 < len(batches):
                upcoming = reader.submit(read_windows, plan.slide, plan.grid, batches[index + 1])
            output = predictor(windows)
            for k, tile in enumerate(tiles):
                probs = output["probabilities"][k] if probabilities else None
                plan.store.write_tile(tile, output["labels"][k], probs)
            if bar is not None:
                bar.update(len(tiles))
                bar.set_postfix_str(f"{_mpx(bar.n, plan.grid) / max(bar.format_dict['elapsed'], 1e-9):.2f} Mpx/s")
    if bar is not None:
        bar.close()
    return predictor.busy_seconds


def _mpx(tiles_done: int, grid: TileGrid) -> float:
    return tiles_done * grid.tile_size**2 / 1e6


def _progress_bar(plan: SlidePlan, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=len(plan.tiles), desc=Path(plan.slide.name).stem, unit="tile")


def tiled_logits(source: Any, model: torch.nn.Module, tile_size: int, level: int = 0, batch_size: int = 4) -> np.ndarray:
    """Assemble the tiled float32 logits (K, H, W) in memory, through the same geometry, reader and tile
    function as :func:`segment_slide`; for checking exactness against :func:`whole_image_logits`."""
    slide = open_slide(source, level)
    grid = tile_grid_for_model(model, slide.size, tile_size)
    predictor = TilePredictor.for_grid(model, grid, device="cpu")
    mosaic = np.zeros((model.num_classes, *grid.shape), dtype=np.float32)
    for tiles in batched(list(grid), batch_size):
        logits = predictor(read_windows(slide, grid, tiles), return_logits=True)["logits"]
        for k, tile in enumerate(tiles):
            y0, x0, y1, x1 = tile.box
            mosaic[:, y0:y1, x0:x1] = logits[k][:, : tile.height, : tile.width]
    return mosaic
