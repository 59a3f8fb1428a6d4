"""The one tile path every executor takes, a shard at a time: read the shard's input region once, cut its
tiles' windows from it, predict them in batches (:class:`~pipeline.inference.predict.TilePredictor`), write
the shard whole, show progress.

The in-process engine and the Ray model actors (:class:`ShardActor`) and tasks all go through
:func:`run_shard` (or its three parts), so a tile is read, cut, predicted and written the same way whoever
runs it; training's validation and the
exactness checks use :func:`tiled_region_logits`, the same windows and predictor kept in memory.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from pipeline.inference.predict import TilePredictor, resolve_compile, windows_per_batch
from pipeline.slides.geometry import ForwardWindow, Shard, TileGrid, forward_windows, tile_grid_for_model
from pipeline.slides.shard_blocks import ShardBlocks
from pipeline.slides.sources import read_window
from pipeline.text import one_line

logger = logging.getLogger(__name__)


def window_of(slide: Any, grid: TileGrid, tile: Any) -> np.ndarray:
    """The tile's (I, I, C) input window: its valid centre plus the halo, mirrored at the slide border."""
    return slide.read_window(*grid.input_origin(tile), grid.input_size)


def read_windows(slide: Any, grid: TileGrid, tiles: Iterable[Any]) -> np.ndarray:
    """(N, I, I, C) windows of ``tiles`` of one slide, one read each (benchmarks, tests)."""
    return np.stack([window_of(slide, grid, tile) for tile in tiles])


ShardInput = tuple  # (pixels (h, w, C) uint8, origin (y, x) in slide pixels): a shard's input block


SLIDES_KEPT = 4  # slides whose block descriptions a process keeps (an actor works on one or two at a time)
_blocks: OrderedDict[tuple, ShardBlocks] = OrderedDict()
_blocks_lock = threading.Lock()


def blocks_for(plan: Any) -> ShardBlocks:
    """The slide's :class:`ShardBlocks`, built once per process and slide: Ray hands every actor call and read
    task a fresh copy of the plan, so the cache is keyed by what names the slide in a run (its store, grid and
    pixels), not by the plan object."""
    slide = plan.slide
    key = (str(plan.store.path), plan.grid, slide.path or slide.name, tuple(slide.shape), slide.pixels)
    with _blocks_lock:
        if key in _blocks:
            _blocks.move_to_end(key)
            return _blocks[key]
    blocks = ShardBlocks(slide, plan.grid)  # outside the lock: two threads may build it, one is kept
    with _blocks_lock:
        _blocks[key] = blocks
        while len(_blocks) > SLIDES_KEPT:
            _blocks.popitem(last=False)
    return blocks


def read_shard(plan: Any, shard: Shard, blocks: ShardBlocks | None = None) -> ShardInput:
    """The shard's input block, read once: every window of its tiles, mirrored at the slide border.

    ``blocks``: the slide's :class:`ShardBlocks` (the in-process engine builds it per plan); by default this
    process's cached one (:func:`blocks_for`)."""
    return (blocks or blocks_for(plan)).read(shard)


def cut_windows(region: np.ndarray, origin: tuple[int, int], grid: TileGrid, windows: Iterable[Any]) -> np.ndarray:
    """(N, I, I, C) input windows cut from a region read at ``origin`` (slide pixels), each equal to its own
    read: of tiles (``I`` = the grid's input size), or of :class:`ForwardWindow` s of one side
    (``I`` = side + reach)."""
    top, left = origin
    stack = []
    for window in windows:
        y, x = window.y - grid.halo, window.x - grid.halo
        size = getattr(window, "side", grid.tile_size) + grid.reach
        stack.append(region[y - top : y - top + size, x - left : x - left + size])
    return np.stack(stack)


@dataclass
class ShardOutput:
    """A shard's predicted pixels, ready to write: ``labels`` (h, w), ``probabilities`` (K, h, w) or None."""

    labels: np.ndarray
    probabilities: np.ndarray | None
    model_seconds: float
    tiles: int


def tile_parts(window: ForwardWindow) -> Iterator[tuple[Any, tuple[slice, slice]]]:
    """Each tile of ``window`` with where its valid pixels lie in the window's output (rows, columns)."""
    for tile in window.tiles:
        oy, ox = tile.y - window.y, tile.x - window.x
        yield tile, (slice(oy, oy + tile.height), slice(ox, ox + tile.width))


def forward_batches(windows: list[ForwardWindow], tile_size: int, batch_size: int) -> Iterator[list[ForwardWindow]]:
    """Batches of windows of one side, each of at most ``batch_size`` tiles' pixels (at least one window)."""
    for side in sorted({w.side for w in windows}, reverse=True):
        same = [w for w in windows if w.side == side]
        per_batch = windows_per_batch(batch_size, tile_size, side)
        for start in range(0, len(same), per_batch):
            yield same[start : start + per_batch]


def predict_shard(predictor: Any, plan: Any, shard: Shard, block: ShardInput, batch_size: int,
                  lock: Any = None) -> ShardOutput:  # fmt: skip
    """Run the shard's tiles and paste each valid centre into the shard's block: in forward windows of
    ``predictor.forward_tiles`` x ``forward_tiles`` tiles where the tiles to run fill a block
    (:func:`~pipeline.slides.geometry.forward_windows`), in batches of ``batch_size`` tiles' pixels.

    Tiles not run (no tissue) stay 0: background, and the arrays' fill value, also inside a window that
    computed them. ``lock``: held around each forward pass, so two threads sharing one predictor (a Ray actor
    reading beside its model) take turns."""
    grid, (y0, x0, y1, x1) = plan.grid, shard.box
    labels = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    probabilities = None
    model_seconds = 0.0
    region, origin = block
    windows = forward_windows(grid, shard, predictor.forward_tiles)
    for batch in forward_batches(windows, grid.tile_size, batch_size):
        pixels = cut_windows(region, origin, grid, batch)
        with lock or nullcontext():
            before = predictor.busy_seconds
            output = predictor(pixels)
            model_seconds += predictor.busy_seconds - before
        if plan.probabilities and "probabilities" not in output:
            raise ValueError(f"{plan.store.path}: its store holds probabilities but the predictor made none")
        if plan.probabilities and probabilities is None:
            probabilities = np.zeros((output["probabilities"].shape[1], y1 - y0, x1 - x0), dtype=np.uint8)
        for k, window in enumerate(batch):
            for tile, part in tile_parts(window):
                ty, tx, tyy, txx = tile.box
                labels[ty - y0 : tyy - y0, tx - x0 : txx - x0] = output["labels"][k][part]
                if probabilities is not None:
                    probabilities[:, ty - y0 : tyy - y0, tx - x0 : txx - x0] = \
                        output["probabilities"][k][(slice(None), *part)]  # fmt: skip
    return ShardOutput(labels, probabilities, model_seconds, len(shard.tiles))


class ShardWriteError(RuntimeError):
    """A shard could not be written (full disk, permissions, a store removed or taken over); names the store."""


def write_shard(plan: Any, shard: Shard, output: ShardOutput) -> None:
    """``OutputStore.write_shard``: the whole shard, durable, then marked done."""
    try:
        plan.store.write_shard(shard, output.labels, output.probabilities)
    except Exception as error:
        raise ShardWriteError(f"writing {plan.store.path}: {one_line(error)}") from error


def run_shard(plan: Any, shard: Shard, predictor: Any, batch_size: int, lock: Any = None) -> ShardOutput:
    """Read, predict and write one shard (CPU actors)."""
    output = predict_shard(predictor, plan, shard, read_shard(plan, shard), batch_size, lock)
    write_shard(plan, shard, output)
    return output


@dataclass
class ShardOutcome:
    """What the driver hears about one shard: its tiles, the model's seconds, or the one-line reason it failed."""

    tiles: int = 0
    model_seconds: float = 0.0
    error: str | None = None


def compile_when_it_pays(predictor: TilePredictor, setting: bool | str, tiles: int) -> bool | str:
    """``--compile auto``: start compiling ``predictor`` once the work known so far (``tiles``) makes it pay
    (:func:`~pipeline.inference.predict.resolve_compile`), going on eagerly if compiling fails. Returns the
    setting for the next call: ``"started"`` once started, so a failed compile is not tried again."""
    if setting == "auto" and resolve_compile("auto", predictor.device, tiles):
        logger.info("compiling the model (torch.compile): %d tiles of work ahead", tiles)
        predictor.start_compiling(True, eager_if_it_fails=True)
        return "started"
    return setting


SHARDS_IN_FLIGHT = 2  # calls per CPU actor: one reading or writing while the other is in the forward pass


class ShardActor:
    """One TilePredictor per actor (the model fetched from the object store once), for every slide of the run.

    CPU actors run whole shards (:meth:`run`) with two calls at once: one shard's read and write (OpenSlide,
    numpy, zarr: mostly outside the GIL) overlap the other's forward pass, and a lock keeps forward passes
    one at a time, so the model's threads are never shared. GPU actors only predict (:meth:`predict`)."""

    def __init__(self, model: Any, tile_size: int, device: str, amp: str | None, probabilities: bool,
                 compile: bool | str, batch_size: int, threads: int, forward_tiles: int | None = None) -> None:  # fmt: skip
        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)  # process-wide: the call threads pick it up at their first op
        grid = tile_grid_for_model(model, (tile_size, tile_size), tile_size)  # the geometry every slide shares
        self.predictor = TilePredictor.for_grid(model, grid, device=device, amp=amp, probabilities=probabilities,
                                                compile=False if compile == "auto" else compile, batch_size=batch_size,
                                                forward_tiles=forward_tiles)  # fmt: skip
        self.batch_size, self.forward_lock = batch_size, threading.Lock()
        self.compile, self.tiles_run = compile, 0

    def _before(self, plan: Any, shard: Shard) -> None:
        """Count the work: ``--compile auto`` compiles when this slide, or all this actor has run, is big enough."""
        with self.forward_lock:
            self.compile = compile_when_it_pays(self.predictor, self.compile, max(plan.tiles_to_run, self.tiles_run))
            self.tiles_run += len(shard.tiles)

    def run(self, plan: Any, shard: Shard) -> ShardOutcome:
        self._before(plan, shard)
        try:
            output = run_shard(plan, shard, self.predictor, self.batch_size, self.forward_lock)
        except Exception as error:  # a bad read or a failed write fails this shard (and its slide) alone
            return ShardOutcome(error=one_line(error))
        return ShardOutcome(output.tiles, output.model_seconds)

    def predict(self, plan: Any, shard: Shard, block: ShardInput) -> ShardOutput:
        self._before(plan, shard)
        return predict_shard(self.predictor, plan, shard, block, self.batch_size, self.forward_lock)


def write_outcome(plan: Any, shard: Shard, output: ShardOutput) -> ShardOutcome:
    """Write task of GPU runs: the shard whole, durable, then marked done."""
    try:
        write_shard(plan, shard, output)
    except Exception as error:
        return ShardOutcome(error=one_line(error))
    return ShardOutcome(output.tiles, output.model_seconds)


def tiled_region_logits(image: Any, grid: TileGrid, predictor: Any, origin: tuple[int, int] = (0, 0),
                        batch_size: int = 4) -> np.ndarray:  # fmt: skip
    """Float32 logits (K, H, W) of the region of ``image`` at ``origin`` that ``grid`` covers, tiled with the
    inference geometry: the forward windows a shard as large as the region would run (``predictor.forward_tiles``),
    each read with :func:`read_window` (mirrored only outside ``image``). For checking exactness (whole level)
    and for validation (held-out regions)."""
    whole = replace(grid, shard_tiles=max(grid.rows, grid.cols))
    mosaic: np.ndarray | None = None
    for batch in forward_batches(forward_windows(whole, whole.shard(0, 0), predictor.forward_tiles), grid.tile_size,
                                 batch_size):  # fmt: skip
        windows = []
        for window in batch:
            pixels = read_window(image, origin[0] + window.y - grid.halo, origin[1] + window.x - grid.halo,
                                 window.side + grid.reach)  # fmt: skip
            windows.append(pixels[..., None] if pixels.ndim == 2 else pixels)
        logits = predictor(np.stack(windows), return_logits=True)["logits"]
        if mosaic is None:
            mosaic = np.zeros((logits.shape[1], *grid.shape), dtype=np.float32)
        for k, window in enumerate(batch):
            for tile, part in tile_parts(window):
                y0, x0, y1, x1 = tile.box
                mosaic[:, y0:y1, x0:x1] = logits[k][(slice(None), *part)]
    return mosaic


class TileProgress:
    """One slide's progress bar (tqdm), with output Mpx/s and how busy the model was; None-safe when disabled."""

    def __init__(self, plan: Any, enabled: bool, position: int | None = None) -> None:
        self.grid, self.started, self.bar = plan.grid, time.perf_counter(), None
        if enabled and plan.shards:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=plan.tiles_to_run, desc=Path(plan.slide.name).stem, unit="tile", position=position)

    def update(self, tiles: int, tiles_done: int, model_seconds: float) -> None:
        if self.bar is None:
            return
        self.bar.update(tiles)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        mpx = tiles_done * self.grid.tile_size**2 / 1e6
        self.bar.set_postfix_str(f"{mpx / elapsed:.2f} Mpx/s, model busy {model_seconds / elapsed:.0%}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
