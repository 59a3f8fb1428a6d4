"""The one tile-batch path every executor takes: read a batch of tiles' windows (each with its own error),
predict (:class:`~pipeline.inference.predict.TilePredictor`), write the batch, show progress.

The in-process engine, the Ray stages and training's validation all go through these functions, so a tile is
read, cut, predicted and written the same way whoever runs it. Tiles are addressed as ``(plan index, row,
col)`` keys into a list of plans: the Ray stream carries exactly these three numbers per tile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.slides.geometry import TileGrid
from pipeline.slides.sources import read_window
from pipeline.text import one_line

TileKey = tuple[int, int, int]  # (plan index, row, col)


def window_of(slide: Any, grid: TileGrid, tile: Any) -> np.ndarray:
    """The tile's (I, I, C) input window: its valid centre plus the halo, mirrored at the slide border."""
    return slide.read_window(*grid.input_origin(tile), grid.input_size)


def read_windows(slide: Any, grid: TileGrid, tiles: Iterable[Any]) -> np.ndarray:
    """(N, I, I, C) windows of ``tiles`` of one slide, raising at the first failed read (benchmarks, tests)."""
    return np.stack([window_of(slide, grid, tile) for tile in tiles])


def read_batch(plans: Sequence[Any], keys: Sequence[TileKey], *, raise_errors: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(N, I, I, C) uint8 input windows of the tiles ``keys``, mirrored at the slide border, and one error
    per tile ("" when read). A failed read leaves zeros and its one-line reason, so one bad slide never
    stops the others; ``raise_errors`` re-raises instead (the in-process engine: one slide, fail fast)."""
    size = plans[0].grid.input_size
    channels = plans[keys[0][0]].slide.shape[2] if len(keys) else 3
    windows = np.zeros((len(keys), size, size, channels), dtype=np.uint8)
    errors = np.full(len(keys), "", dtype=object)
    for k, (index, row, col) in enumerate(keys):
        plan = plans[index]
        try:
            windows[k] = window_of(plan.slide, plan.grid, plan.grid.tile(row, col))
        except Exception as error:
            if raise_errors:
                raise
            errors[k] = one_line(error)
    return windows, errors


def write_batch(plans: Sequence[Any], keys: Sequence[TileKey], labels: np.ndarray, probabilities: np.ndarray | None,
                errors: np.ndarray, *, raise_errors: bool = False) -> np.ndarray:  # fmt: skip
    """``OutputStore.write_tile`` for each tile that has no error yet (whole chunks, durable, then its state);
    returns the errors with the failed writes' reasons added (the store named)."""
    errors = errors.copy()
    for k, (index, row, col) in enumerate(keys):
        if errors[k]:
            continue
        plan = plans[index]
        try:
            if plan.probabilities and probabilities is None:
                raise ValueError(f"{plan.store.path}: its store holds probabilities but the predictor made none")
            probs = probabilities[k] if plan.probabilities else None
            plan.store.write_tile(plan.grid.tile(row, col), labels[k], probs)
        except Exception as error:  # full disk, permissions, a lost lock, ...
            if raise_errors:
                raise
            errors[k] = f"writing {plan.store.path}: {one_line(error)}"
    return errors


def tiled_region_logits(image: Any, grid: TileGrid, predictor: Any, origin: tuple[int, int] = (0, 0),
                        batch_size: int = 4) -> np.ndarray:  # fmt: skip
    """Float32 logits (K, H, W) of the region of ``image`` at ``origin`` that ``grid`` covers, tiled with the
    inference geometry: each window read with :func:`read_window` (mirrored only outside ``image``) and run by
    ``predictor``. For checking exactness (whole level) and for validation (held-out regions)."""
    tiles = list(grid)
    mosaic: np.ndarray | None = None
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        windows = []
        for tile in batch:
            y, x = grid.input_origin(tile)
            window = read_window(image, origin[0] + y, origin[1] + x, grid.input_size)
            windows.append(window[..., None] if window.ndim == 2 else window)
        logits = predictor(np.stack(windows), return_logits=True)["logits"]
        if mosaic is None:
            mosaic = np.zeros((logits.shape[1], *grid.shape), dtype=np.float32)
        for k, tile in enumerate(batch):
            y0, x0, y1, x1 = tile.box
            mosaic[:, y0:y1, x0:x1] = logits[k][:, : tile.height, : tile.width]
    return mosaic


class TileProgress:
    """One slide's progress bar (tqdm), with output Mpx/s and how busy the model was; None-safe when disabled."""

    def __init__(self, plan: Any, enabled: bool, position: int | None = None) -> None:
        self.grid, self.started, self.bar = plan.grid, time.perf_counter(), None
        if enabled and plan.tiles:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(plan.tiles), desc=Path(plan.slide.name).stem, unit="tile", position=position)

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


def keys_of(index: int, tiles: Iterable[Any]) -> list[TileKey]:
    """Keys of ``tiles`` (with ``row`` and ``col``) of the plan at ``index``."""
    return [(index, tile.row, tile.col) for tile in tiles]
