"""Apply a tissue mask to a slide's tile plan: tiles without tissue are never read or run.

The mask is computed once per slide from a low-resolution thumbnail (or supplied by the user) before the
output store exists; the store is then created with the mask (``tissue/mask``, for inspection and
downstream tissue areas) and with the tiles to run recorded in ``tiles/tissue``, so skipped tiles' pixels
stay background (the label array's fill value) and a resumed run never needs the mask again.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.slides.geometry import TileGrid
from pipeline.slides.sources import SlideSource

logger = logging.getLogger(__name__)

MASK_MAX_SIDE = 2048  # thumbnail side for detection: ~1/32 of a 60k-px slide, enough for 256-px tiles


def slide_tissue_mask(slide: SlideSource, tissue_mask: Any) -> np.ndarray:
    """A boolean mask covering the whole slide: detected (``True``), from an image path, or given as an array."""
    from pipeline.slides import tissue

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


def describe_tissue_option(tissue_mask: Any) -> str:
    """What decided the skipped tiles, for provenance: a resumed run must use the same (stores compare it)."""
    if tissue_mask is None:
        return "none"
    if tissue_mask is True:
        return "detected"
    if isinstance(tissue_mask, (str, Path)):
        return f"image sha256:{hashlib.sha256(Path(tissue_mask).read_bytes()).hexdigest()[:16]}"
    return f"array sha256:{hashlib.sha256(np.ascontiguousarray(np.asarray(tissue_mask, dtype=bool))).hexdigest()[:16]}"


def tissue_tiles(grid: TileGrid, mask: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: the tiles that hold tissue by ``mask`` and are run (pure: writes nothing)."""
    from pipeline.slides import tissue

    scale = mask.shape[0] / grid.shape[0]
    tiles = list(grid)
    keep = np.zeros((grid.rows, grid.cols), dtype=bool)
    for tile, has_tissue in zip(tiles, tissue.tiles_with_tissue(mask, scale, [tile.box for tile in tiles])):
        keep[tile.row, tile.col] = has_tissue
    logger.info("%d of %d tiles hold tissue", int(keep.sum()), len(tiles))
    return keep
