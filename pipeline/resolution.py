"""Choosing the resolution to segment at: a pyramid level by µm/px, resampled when the model needs it.

A model trained at 0.5 µm/px sees nuclei of a certain size; running it on a 0.25 µm/px level halves
its field of view in tissue terms. ``open_at_mpp`` takes the level whose µm/px is closest at or below
the target and, if that level is not within ``tolerance`` of it, resamples it. The resampled view is
computed per output pixel from fixed source pixels (bilinear at pixel centres), so any region read of it
equals the same region of the whole resampled image and overlap-tiling stays exact on it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from pipeline.slide import SlideError, SlideSource, open_slide

logger = logging.getLogger(__name__)

MAX_UPSAMPLING = 2.0  # a model trained at 0.5 µm/px runs on a 1 µm/px (10x) scan; beyond that, refuse


def level_for_mpp(level_mpps: list[float], target: float) -> int:
    """Index of the level whose µm/px is closest at or below ``target`` (level 0 if all are coarser)."""
    finer = [(mpp, i) for i, mpp in enumerate(level_mpps) if mpp <= target * (1 + 1e-6)]
    return max(finer)[1] if finer else 0


def _level_mpps(source: Any, base: SlideSource) -> list[float]:
    count = getattr(base, "level_count", 1)
    if count == 1:
        return [base.mpp]
    return [open_slide(source, level).mpp for level in range(count)]


class ResampledSource(SlideSource):
    """``base`` scaled by 1 / ``factor`` (factor = target µm/px / base µm/px), bilinear at pixel centres."""

    def __init__(self, base: SlideSource, factor: float):
        self.base, self.factor = base, float(factor)
        self.path, self.name, self.level = base.path, base.name, base.level
        self.mpp = base.mpp * self.factor if base.mpp else None
        height, width, channels = base.shape
        self.shape = (max(1, math.floor(height / factor)), max(1, math.floor(width / factor)), channels)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        from scipy import ndimage  # only resampled slides need it; workers start sooner without it

        ys = (np.arange(y0, y1) + 0.5) * self.factor - 0.5
        xs = (np.arange(x0, x1) + 0.5) * self.factor - 0.5
        height, width = self.base.size
        by0, bx0 = max(0, math.floor(ys[0])), max(0, math.floor(xs[0]))
        by1, bx1 = min(height, math.floor(ys[-1]) + 2), min(width, math.floor(xs[-1]) + 2)
        block = self.base.read(by0, by1, bx0, bx1).astype(np.float32)
        grid_y, grid_x = np.meshgrid(np.clip(ys, 0, height - 1) - by0, np.clip(xs, 0, width - 1) - bx0, indexing="ij")
        channels = [ndimage.map_coordinates(block[..., c], [grid_y, grid_x], order=1, mode="nearest") for c in range(block.shape[2])]
        return np.clip(np.rint(np.stack(channels, axis=-1)), 0, 255).astype(np.uint8)


def open_at_mpp(source: Any, target_mpp: float, tolerance: float = 0.05) -> SlideSource:
    """Open ``source`` at ``target_mpp`` µm/px: best pyramid level, resampled if off by more than ``tolerance``."""
    base = open_slide(source, 0)
    if base.mpp is None:
        raise SlideError(f"{base.path or base.name}: has no µm/px metadata; choose a level instead (--level N)")
    mpps = _level_mpps(source, base)
    level = level_for_mpp(mpps, target_mpp)
    slide = open_slide(source, level) if level else base
    factor = target_mpp / slide.mpp
    if abs(factor - 1) <= tolerance:
        return slide
    if factor < 1 / MAX_UPSAMPLING:  # a 10x scan for a 40x model, or pixel-size metadata that is wrong
        raise SlideError(
            f"{slide.path or slide.name}: its finest level is {slide.mpp:.4g} µm/px, {1 / factor:.0f}x coarser than "
            f"the {target_mpp:g} µm/px asked for; upsampling that far invents pixels (and a huge image): "
            "segment it as it is with --level 0, or check its pixel-size metadata"
        )
    logger.info("%s: level %d is %.3f µm/px; resampling to %.3f µm/px", slide.name, level, slide.mpp, target_mpp)
    return ResampledSource(slide, factor)


def open_for_segmentation(
    source: Any, level: int | None = None, target_mpp: float | None = None, mpp: float | None = None,
    require_mpp: bool = False,
) -> SlideSource:  # fmt: skip
    """The view a run segments: ``level`` if given; else ``target_mpp``; else level 0. ``mpp`` overrides the
    file's µm/px metadata. A slide without µm/px cannot honour ``target_mpp``: with ``require_mpp`` (the
    user asked for that µm/px) it is an error, otherwise (the model's default) level 0 with a warning."""
    if target_mpp is None or level is not None:
        return open_slide(source, level or 0, mpp)
    if mpp is not None:
        return open_at_mpp(open_slide(source, 0, mpp), target_mpp)
    try:
        return open_at_mpp(source, target_mpp)
    except SlideError as error:
        if "no µm/px" not in str(error):
            raise
        if require_mpp:
            raise SlideError(f"{error} (--mpp {target_mpp:g} needs the slide's pixel size)") from None
        logger.warning("%s; segmenting level 0", error)
        return open_slide(source, 0)
