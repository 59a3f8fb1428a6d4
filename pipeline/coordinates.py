"""Where a result store's pixels sit on the slide: the segmented level's downsample relative to level 0.

Review tools (QuPath, ASAP, OpenSlide viewers) address a slide in level-0 pixels, while a store holds the
mask of the level (possibly resampled) that was segmented. A store pixel edge ``e`` lies at ``e * d`` in
level-0 pixels, with ``d`` = level-0 pixels per segmented pixel. New stores record ``d`` in their
provenance (``level0_downsample``); for older stores it is recovered from the slide, when it can be opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def slide_level0_downsample(slide: Any) -> float | None:
    """Level-0 pixels per pixel of ``slide`` (a :class:`pipeline.slide.SlideSource` view), or None if unknown.

    A resampled view (``base`` and ``factor``) multiplies its base level's downsample by the factor; an
    OpenSlide level has its own ``downsample``; other pyramids compare their size with level 0's, averaging
    the two axes as OpenSlide does.
    """
    base, factor = getattr(slide, "base", None), getattr(slide, "factor", None)
    if base is not None and factor is not None:
        inner = slide_level0_downsample(base)
        return inner * float(factor) if inner is not None else None
    if getattr(slide, "downsample", None) is not None:
        return float(slide.downsample)
    if not getattr(slide, "level", 0):
        return 1.0
    if not slide.path:
        return None
    from pipeline.slide import open_slide

    full = open_slide(slide.path, 0)
    return _size_ratio(full.size, slide.size)


def _size_ratio(level0: tuple[int, int], level: tuple[int, int]) -> float:
    return (level0[0] / level[0] + level0[1] / level[1]) / 2


def store_level0_downsample(info: dict[str, Any], store: str | Path = "") -> float:
    """The downsample recorded in a store's provenance ``info``; for stores written before it was recorded,
    recovered from the slide (µm/px ratio, else size ratio), else 1.0 with a warning (coordinates are then
    in pixels of the segmented level)."""
    recorded = info.get("level0_downsample")
    if recorded:
        return float(recorded)
    source, level, shape = info.get("source"), int(info.get("level") or 0), info.get("shape")
    try:
        from pipeline.slide import open_slide

        full = open_slide(source, 0)
        if info.get("mpp") and full.mpp:
            return float(info["mpp"]) / float(full.mpp)
        return _size_ratio(full.size, tuple(shape))
    except Exception as error:  # the slide moved or is unreadable: the store alone says too little
        if level == 0 and not info.get("mpp"):
            return 1.0  # level 0 without µm/px cannot have been resampled
        logger.warning(
            "%s: provenance has no level0_downsample and the slide %s cannot be opened (%s); taking the "
            "segmented level %d as level 0 (coordinates are off if it was a lower level or resampled)",
            store, source, error, level,
        )  # fmt: skip
        return 1.0
