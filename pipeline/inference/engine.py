"""In-process overlap-tile engine: slide -> tiles -> U-Net -> valid centres -> OME-Zarr mosaic.

``segment_slide`` is the reference executor; the Ray job runs the very same pieces (``plan_slide``,
``TilePredictor``, ``OutputStore.write_tile``) on CPU workers and GPU actors.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.analysis.instance_labels import finalize_instances
from pipeline.analysis.instances import InstanceRule
from pipeline.slides.geometry import Shard, TileGrid, default_shard_tiles, tile_grid_for_model
from pipeline.inference.predict import TilePredictor
from pipeline.inference.tile_batches import (
    TileProgress, compile_when_it_pays, predict_shard, read_shard, tiled_region_logits, write_shard,
)  # fmt: skip
from pipeline.slides.resolution import implausible_mpp, open_for_segmentation
from pipeline.slides.pyramid import open_slide
from pipeline.slides.sources import SlideLimits, SlideSource
from pipeline.slides.shard_blocks import ShardBlocks, check_shard_reach
from pipeline.store.locking import StoreLock
from pipeline.store.output_store import OutputStore, create_output_store, open_existing_store
from pipeline.store.slide_overview import SLIDE_IMAGES
from pipeline.store.shard_state import TILE_DONE, TILE_PENDING, TILE_SKIPPED

logger = logging.getLogger(__name__)


@dataclass
class SlidePlan:
    """One slide's facts, decided before its first tile runs; every executor and stage takes them from here.

    The slide (source, level, ``level0_downsample``), the tile grid (the model's geometry), the store and
    whether it holds probabilities, the checksum of the model the plan was made for, and the shards still to
    run, each with its tissue tiles (the Ray stages get the plan without that list: each task names its shard)."""

    slide: SlideSource
    grid: TileGrid
    store: OutputStore
    shards: list[Shard]  # shards still to run, each with its tiles to run
    skipped: int  # tiles not run because they hold no tissue
    already_done: int  # tiles finished by an earlier (resumed) run
    complete: bool = False  # the store was already complete before this run: nothing to do, kept as it is
    probabilities: bool = False  # the store has probabilities/0: the predictor makes them, write_tile writes them
    model_checksum: str = ""  # the model the grid and the store were made for (unet.artifact.model_checksum)
    tiles_unlisted: int | None = None  # the tiles to run when the shards' list was left out (the Ray tasks' copy)

    @property
    def tiles_to_run(self) -> int:
        if self.tiles_unlisted is not None:
            return self.tiles_unlisted
        return sum(len(shard.tiles) for shard in self.shards)

    @property
    def level0_downsample(self) -> float:
        return self.slide.level0_downsample

    def finalize(self) -> None:
        """Build the pyramid, the root image of the slide and (when the model carries a rule) the instance labels,
        and mark the store complete; only once every tile is in (checked on disk)."""
        if not self.complete:
            self.store.finalize(self.slide, derived=finalize_instances)

    def result(
        self, tiles_run: int, seconds: float, error: str | None = None, model_seconds: float = 0.0
    ) -> "SegmentResult":
        """The slide's outcome: complete, or ``error`` (one line: why it failed)."""
        return SegmentResult(
            slide=self.slide.path or self.slide.name, output=self.store.path, shape=self.grid.shape,
            level=self.slide.level, mpp=self.slide.mpp, tiles_total=len(self.grid), tiles_run=tiles_run,
            tiles_skipped=self.skipped, seconds=seconds, error=error, tiles_done_earlier=self.already_done,
            kept=self.complete, model_seconds=model_seconds,
        )  # fmt: skip


@dataclass
class SegmentResult:
    """What one slide's run produced: ``ok`` (its store is complete) or ``error`` (one line: why not).

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
    error: str | None = None  # None: the slide is complete
    tiles_done_earlier: int = 0
    kept: bool = False
    model_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        """For people (tables, logs, the run report): "complete" or "failed: <reason>"."""
        return "complete" if self.ok else f"failed: {self.error}"

    @property
    def resumed(self) -> bool:
        return self.tiles_done_earlier > 0

    @property
    def model_busy(self) -> float:
        return self.model_seconds / self.seconds if self.seconds > 0 else 0.0

    @property
    def megapixels_per_second(self) -> float | None:
        """Slide megapixels per second of this run's own work: the slide's area times the share of its tiles to
        run that this run ran (a resumed slide counts only what this run did); None for a kept output."""
        if self.kept or self.seconds <= 0:
            return None
        to_run = self.tiles_total - self.tiles_skipped
        share = self.tiles_run / to_run if to_run > 0 else 1.0
        return self.shape[0] * self.shape[1] / 1e6 * share / self.seconds

    def to_dict(self) -> dict[str, Any]:
        rate = self.megapixels_per_second
        return {**asdict(self), "status": self.status, "resumed": self.resumed,
                "mpx_per_s": None if rate is None else round(rate, 4), "model_busy": round(self.model_busy, 4)}  # fmt: skip


def resolve_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    if isinstance(model, (str, Path)):
        from unet import load_model

        return load_model(model)
    return model


def provenance(slide: SlideSource, grid: TileGrid, model: torch.nn.Module, chunk: int, probabilities: bool,
               tissue: str = "none", requested: dict | None = None) -> dict:  # fmt: skip
    import dask
    import zarr

    from unet.artifact import model_checksum

    return {
        "source": os.path.abspath(slide.path) if slide.path else slide.name,  # absolute: the store may move
        "level": slide.level,
        "shape": list(grid.shape),
        "mpp": slide.mpp,
        "level0_downsample": slide.level0_downsample,  # level-0 px per stored px (GeoJSON export)
        "pixels": slide.pixels,  # how they were read: a store resumed by a later version must read them alike
        "tile_size": grid.tile_size,
        "chunk": chunk,
        "shard_tiles": grid.shard_tiles,
        "halo": grid.halo,
        "input_size": grid.input_size,
        "probabilities": probabilities,
        "tissue": tissue,
        "requested": requested or {},  # the level / µm/px asked for: a rerun keeps a complete store by it alone
        "model_config": model.config.to_dict(),
        "model_checksum": model_checksum(model),
        "class_names": class_names_of(model),
        "model_mpp": model.card.mpp,
        "instances": instance_rule_of(model),  # labels/<name> is made from the mask at finalize when set
        "software": {
            "wsi-unet": software_version(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "zarr": zarr.__version__,
            "dask": dask.__version__,
        },
    }


def software_version() -> str:
    """This project's version, from the installed package's metadata (pyproject.toml), for provenance."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsi-unet")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def instance_rule_of(model: torch.nn.Module) -> dict | None:
    """``{"rule": ...}``: the instance rule the model's card carries (``metadata["instances"]``), checked and
    complete; None without one. The store's finalize adds the ``count``."""
    rule = InstanceRule.from_card(model.card)
    return None if rule is None else {"rule": rule.to_dict()}


def class_names_of(model: torch.nn.Module) -> list[str]:
    names = model.card.class_names
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
    lock_token: str | None = None,
    shard_tiles: int | None = None,
    slide_image: str = "overview",
) -> SlidePlan:
    """Open the slide, lay out the tiles and create (or reopen, with ``resume``) the output store.

    The caller holds the store's lock (:class:`pipeline.store.locking.StoreLock`). ``require_mpp``: a slide
    without µm/px metadata is an error for ``target_mpp`` instead of falling back to level 0. ``shard_tiles``:
    tiles per shard side (default: shards of about 4096 pixels, see :data:`~pipeline.slides.geometry.SHARD_SIDE`).
    ``slide_image``: the store's root image of the slide, "overview" (its thumbnail) or "full" (every pixel).
    """
    if slide_image not in SLIDE_IMAGES:
        raise ValueError(f"slide_image must be one of {', '.join(SLIDE_IMAGES)}, got {slide_image!r}")
    slide = open_for_segmentation(source, level, target_mpp, mpp, require_mpp=require_mpp)
    if slide.mpp and (warning := implausible_mpp(slide.mpp / slide.level0_downsample, slide.path or slide.name)):
        logger.warning("%s", warning)
    in_channels = model.config.in_channels
    if slide.shape[2] != in_channels:
        raise ValueError(
            f"{slide.path or slide.name}: has {slide.shape[2]} channels but the model expects {in_channels}"
        )
    chunk = chunk or tile_size
    grid = tile_grid_for_model(model, slide.size, tile_size, chunk, shard_tiles or default_shard_tiles(tile_size))
    check_shard_reach(grid)
    (limits or SlideLimits()).check(slide.path or slide.name, slide.size, len(grid))  # before any per-tile work
    from pipeline.slides.tissue_tiles import describe_tissue_option, slide_tissue_mask, tissue_tiles

    requested = {"level": level, "target_mpp": target_mpp}
    meta = provenance(slide, grid, model, chunk, probabilities, describe_tissue_option(tissue_mask), requested)
    meta["slide_image"] = slide_image  # read at finalize; a resumed store keeps its own
    store = open_existing_store(out_path, grid, meta, overwrite=overwrite, resume=resume,
                                replace_other_slides=replace_other_slides)  # fmt: skip
    if store is None:
        mask, tissue = None, None
        if tissue_mask is not None:  # before the store exists: a failed read leaves nothing behind
            mask = slide_tissue_mask(slide, tissue_mask)
            tissue = tissue_tiles(grid, mask)
        store = create_output_store(
            out_path, grid, chunk=chunk, class_names=class_names_of(model), mpp=slide.mpp, provenance=meta,
            probabilities=probabilities, tissue_mask=mask, tissue=tissue,
        )  # fmt: skip
    store.lock_token = lock_token  # the caller's StoreLock: the store's writers stop if another job takes it over
    states = store.tile_states()
    pending = grid.shards(states == TILE_PENDING)
    return SlidePlan(
        slide, grid, store, pending, skipped=int((states == TILE_SKIPPED).sum()),
        already_done=int((states == TILE_DONE).sum()), complete=store.status == "complete",
        probabilities=probabilities, model_checksum=meta["model_checksum"],
    )  # fmt: skip


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
    shard_tiles: int | None = None,
    compile: bool | str = False,
    slide_image: str = "overview",
    forward_tiles: int | None = None,
) -> SegmentResult:
    """Segment one slide in-process and write the OME-Zarr mosaic to ``out_path``.

    ``source``: a slide path (OpenSlide formats, TIFF, Zarr) or an (H, W[, C]) uint8 array.
    ``model``: a :class:`unet.UNet` or the path of a saved artifact. ``tile_size``: output side per tile,
    a multiple of the model's alignment (``chunk``, the Zarr chunk, defaults to it). ``level``: the pyramid
    level (default 0), or ``target_mpp``: segment at that µm/px (best level, resampled if needed). ``amp``: None (float32),
    "bf16", "fp16" or "auto". Opt-in: ``resume`` (finish an interrupted store), ``tissue_mask`` (True to
    detect tissue, or a boolean mask image; tiles without tissue are not read and stay background).
    ``forward_tiles``: tiles per side of one forward window (None: as many as make 512 px; tiles stay the unit of
    storage and skipping). ``slide_image``: "overview" (default: the slide's thumbnail at the store's root) or
    "full" (every pixel).
    """
    started = time.perf_counter()
    model = resolve_model(model)
    with StoreLock(out_path) as lock:
        plan = plan_slide(
            source, out_path, model, tile_size=tile_size, level=level, target_mpp=target_mpp, chunk=chunk, mpp=mpp,
            probabilities=probabilities, overwrite=overwrite, resume=resume, tissue_mask=tissue_mask,
            lock_token=lock.token, shard_tiles=shard_tiles, slide_image=slide_image,
        )  # fmt: skip
        busy = run_tiles(plan, model, batch_size, device=device, amp=amp, progress=progress, compile=compile,
                         forward_tiles=forward_tiles)  # fmt: skip
        plan.finalize()
    result = plan.result(plan.tiles_to_run, time.perf_counter() - started, model_seconds=busy)
    logger.info("%s: %d tiles in %.1f s -> %s", result.slide, result.tiles_run, result.seconds, out_path)
    return result


def engine_threads(device: torch.device) -> tuple[int, int]:
    """(reader, writer) threads of the in-process engine: on a GPU enough of the host's cores to keep the
    fused step fed (a 4096² shard takes ~0.3 s to read and ~0.2 s to write on one core, ~40 ms on an H200);
    on the CPU one of each beside the forward pass, which has the cores."""
    if device.type == "cpu":
        return 1, 1
    cores = os.cpu_count() or 1
    return max(1, min(8, cores - 2)), max(1, min(4, cores // 4))


def run_tiles(plan: SlidePlan, model: torch.nn.Module, batch_size: int, *, device: str = "auto",
              amp: str | None = None, progress: bool = False, compile: bool | str = False,
              forward_tiles: int | None = None) -> float:  # fmt: skip
    """Read, predict and write every pending shard of ``plan`` in this process, through the same shard path
    as the Ray actors: shards are read ahead and written behind in threads (:func:`engine_threads`), so the
    model never waits for either; raises at the first failure; returns the seconds spent in the model."""
    predictor = TilePredictor.for_grid(model, plan.grid, device=device, amp=amp, probabilities=plan.probabilities,
                                       compile=False if compile == "auto" else compile, batch_size=batch_size,
                                       forward_tiles=forward_tiles)  # fmt: skip
    compile_when_it_pays(predictor, compile, plan.tiles_to_run)
    bar = TileProgress(plan, progress)
    done = 0
    blocks = ShardBlocks(plan.slide, plan.grid) if plan.shards else None
    read_threads, write_threads = engine_threads(predictor.device)
    with ThreadPoolExecutor(read_threads, "shard-read") as reader, ThreadPoolExecutor(write_threads, "shard-write") as writer:
        reads = deque(reader.submit(read_shard, plan, shard, blocks) for shard in plan.shards[: read_threads + 1])
        writes: deque = deque()
        for index, shard in enumerate(plan.shards):
            block = reads.popleft().result()
            if index + len(reads) + 1 < len(plan.shards):  # keep read_threads + 1 blocks read or being read
                reads.append(reader.submit(read_shard, plan, plan.shards[index + len(reads) + 1], blocks))
            output = predict_shard(predictor, plan, shard, block, batch_size)
            writes.append(writer.submit(write_shard, plan, shard, output))
            while len(writes) > write_threads or (writes and writes[0].done()):  # bounded memory; errors early
                writes.popleft().result()
            done += len(shard.tiles)
            bar.update(len(shard.tiles), done, predictor.busy_seconds)
        for write in writes:
            write.result()
    bar.close()
    return predictor.busy_seconds


def tiled_logits(source: Any, model: torch.nn.Module, tile_size: int, level: int = 0, batch_size: int = 4,
                 amp: str | None = None, forward_tiles: int | None = None) -> np.ndarray:  # fmt: skip
    """Assemble the tiled float32 logits (K, H, W) in memory, through the same geometry, reader and tile
    function as :func:`segment_slide` (``amp``, ``forward_tiles``: its options); for checking exactness against
    :func:`whole_image_logits`."""
    slide = open_slide(source, level)
    grid = tile_grid_for_model(model, slide.size, tile_size)
    predictor = TilePredictor.for_grid(model, grid, device="cpu", amp=amp, forward_tiles=forward_tiles)
    return tiled_region_logits(slide, grid, predictor, batch_size=batch_size)
