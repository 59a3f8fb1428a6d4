"""Apply a tissue mask to a slide's tile plan: tiles without tissue are never read or run.

The mask is computed once per slide from a low-resolution thumbnail (or supplied by the user), stored
in the output (``tissue/mask``) for inspection, and the skipped tiles are recorded as such in
``tiles/state``; their pixels stay background (the label array's fill value).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.geometry import Tile, TileGrid
from pipeline.slide import SlideSource
from pipeline.store import OutputStore

logger = logging.getLogger(__name__)

MASK_MAX_SIDE = 2048  # thumbnail side for detection: ~1/32 of a 60k-px slide, enough for 256-px tiles


def slide_tissue_mask(slide: SlideSource, tissue_mask: Any) -> np.ndarray:
    """A boolean mask covering the whole slide: detected (``True``), from an image path, or given as an array."""
    from pipeline import tissue

    if tissue_mask is True:
        return tissue.tissue_mask(slide.thumbnail(MASK_MAX_SIDE))
    if isinstance(tissue_mask, (str, Path)):
        height, width = slide.size
        scale = min(1.0, MASK_MAX_SIDE / max(height, width))
        return tissue.load_mask_image(tissue_mask, (max(1, round(height * scale)), max(1, round(width * scale))))
    mask = np.asarray(tissue_mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"tissue mask must be a 2-D image, got shape {mask.shape}")
    return mask


def select_tissue_tiles(
    slide: SlideSource, grid: TileGrid, pending: list[Tile], tissue_mask: Any, store: OutputStore
) -> tuple[list[Tile], list[Tile]]:
    """Split ``pending`` into (tiles to run, tiles skipped as background) and record both in the store."""
    from pipeline import tissue

    mask = slide_tissue_mask(slide, tissue_mask)
    scale = mask.shape[0] / grid.shape[0]
    keep = tissue.tiles_with_tissue(mask, scale, [tile.box for tile in pending])
    run = [tile for tile, k in zip(pending, keep) if k]
    skipped = [tile for tile, k in zip(pending, keep) if not k]
    root = zarr.open_group(store.path, mode="r+")
    if "tissue" not in root:
        group = root.create_group("tissue")
        group.create_array("mask", data=mask.astype(np.uint8), chunks=mask.shape, dimension_names=["y", "x"])
        group.attrs["scale"] = float(scale)  # mask pixels per segmented-level pixel
    store.mark_skipped(skipped)
    logger.info("%s: %d of %d tiles hold tissue", slide.name, len(run), len(pending))
    return run, skipped
