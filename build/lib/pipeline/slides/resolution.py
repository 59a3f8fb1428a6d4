"""Choosing the resolution to segment at: a pyramid level by µm/px, resampled when the model needs it.

A model trained at 0.5 µm/px sees nuclei of a certain size; running it on a 0.25 µm/px level halves
its field of view in tissue terms. ``open_at_mpp`` takes the exact level (see :mod:`pipeline.slides.pyramid`)
whose µm/px is closest at or below the target and, if it is not within ``tolerance`` of it, resamples it (by
exactly 2 or 4 when that lands within ``tolerance``: scanners' 0.25 µm/px are 0.24-0.26)
(:class:`pipeline.slides.sources.ResampledSource`, which reads the level through its exact reader), so any region
of the resampled view equals the same region of the whole resampled image and overlap tiling stays exact.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from pipeline.slides.pyramid import SlidePyramid, open_pyramid
from pipeline.slides.sources import ResampledSource, SlideError, SlideSource

logger = logging.getLogger(__name__)

PLAUSIBLE_LEVEL0_MPP = (0.05, 5.0)  # µm/px of slide scanners' full resolution: 0.1-0.3 at 40x ... ~2 at 5x
MAX_UPSAMPLING = 2.0  # a model trained at 0.5 µm/px runs on a 1 µm/px (10x) scan; beyond that, refuse


def implausible_mpp(level0_mpp: float | None, name: str) -> str | None:
    """A one-line warning when a slide's level-0 µm/px is outside what scanners write (wrong metadata makes
    every µm², mm² and density wrong), else None."""
    low, high = PLAUSIBLE_LEVEL0_MPP
    if level0_mpp is None or low <= level0_mpp <= high:
        return None
    return (f"{name}: its metadata says {level0_mpp:g} µm/px at full resolution, outside the {low:g}-{high:g} that "
            "slide scanners write; areas, densities and --mpp choices use it: check it, or give the right value "
            "(segment_slide(..., mpp=X))")


def level_for_mpp(level_mpps: list[float], target: float) -> int:
    """Index of the level whose µm/px is closest at or below ``target`` (level 0 if all are coarser)."""
    finer = [(mpp, i) for i, mpp in enumerate(level_mpps) if mpp <= target * (1 + 1e-6)]
    return max(finer)[1] if finer else 0


def open_at_mpp(source: Any, target_mpp: float, tolerance: float = 0.05) -> SlideSource:
    """Open ``source`` at ``target_mpp`` µm/px: best exact pyramid level, resampled if off by more than ``tolerance``."""
    pyramid = open_pyramid(source)
    if pyramid.mpp is None:
        raise SlideError(f"{pyramid.path or pyramid.name}: has no µm/px metadata; choose a level instead (--level N)")
    exact = [i for i, level in enumerate(pyramid.levels) if level.native]
    level = exact[level_for_mpp([pyramid.level_mpp(i) for i in exact], target_mpp)]
    slide = pyramid.level(level)
    factor = target_mpp / slide.mpp
    if abs(factor - 1) <= tolerance:
        return slide
    halvings = 2.0 ** round(math.log2(factor))
    if halvings >= 2 and abs(factor / halvings - 1) <= tolerance:  # a 0.2527 µm/px scan for a 0.5 µm/px model
        factor = halvings  # by 2 every sample is a 2 x 2 mean, exact and as cheap as the read
    if factor < 1 / MAX_UPSAMPLING:  # a 10x scan for a 40x model, or pixel-size metadata that is wrong
        raise SlideError(
            f"{slide.path or slide.name}: its finest level is {slide.mpp:.4g} µm/px, {1 / factor:.0f}x coarser than "
            f"the {target_mpp:g} µm/px asked for; upsampling that far invents pixels (and a huge image): "
            "segment it as it is with --level 0, or check its pixel-size metadata"
        )
    logger.info("%s: level %d is %.4g µm/px; resampling by %.4g to %.4g µm/px (asked: %g)", slide.name, level,
                slide.mpp, factor, slide.mpp * factor, target_mpp)  # fmt: skip
    return ResampledSource(slide, factor)


def open_for_segmentation(
    source: Any, level: int | None = None, target_mpp: float | None = None, mpp: float | None = None,
    require_mpp: bool = False,
) -> SlideSource:  # fmt: skip
    """The view a run segments: ``level`` if given; else ``target_mpp``; else level 0. ``mpp`` overrides the
    µm/px of level 0 in the file's metadata. The slide is opened once. A slide without µm/px cannot honour
    ``target_mpp``: with ``require_mpp`` (the user asked for that µm/px) it is an error, otherwise (the
    model's default) level 0 with a warning."""
    pyramid: SlidePyramid = open_pyramid(source, mpp)
    if target_mpp is None or level is not None:
        return pyramid.level(level or 0)
    try:
        return open_at_mpp(pyramid, target_mpp)
    except SlideError as error:
        if "no µm/px" not in str(error):
            raise
        if require_mpp:
            raise SlideError(f"{error} (--mpp {target_mpp:g} needs the slide's pixel size)") from None
        logger.warning("%s; segmenting level 0", error)
        return pyramid.level(0)
