"""Where a result store's pixels sit on the slide: the segmented level's downsample relative to level 0.

Review tools (QuPath, ASAP, OpenSlide viewers) address a slide in level-0 pixels, while a store holds the
mask of the level (possibly resampled) that was segmented. A store pixel edge ``e`` lies at ``e * d`` in
level-0 pixels, with ``d`` = level-0 pixels per segmented pixel. New stores record ``d`` in their
provenance (``level0_downsample``, from the slide view's own ``level0_downsample``); for older stores it is
recovered from the slide's pyramid, when the slide can be opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def store_level0_downsample(info: dict[str, Any], store: str | Path = "") -> float:
    """The downsample recorded in a store's provenance ``info``; for stores written before it was recorded,
    recovered from the slide (µm/px ratio, else size ratio), else 1.0 with a warning (coordinates are then
    in pixels of the segmented level)."""
    recorded = info.get("level0_downsample")
    if recorded:
        return float(recorded)
    source, level, shape = info.get("source"), int(info.get("level") or 0), info.get("shape")
    try:
        from pipeline.slides.pyramid import open_pyramid
        from pipeline.slides.formats import mean_downsample

        pyramid = open_pyramid(source)
        if info.get("mpp") and pyramid.mpp:
            return float(info["mpp"]) / float(pyramid.mpp)
        return mean_downsample(pyramid.levels[0].shape, tuple(shape))
    except Exception as error:  # the slide moved or is unreadable: the store alone says too little
        if level == 0 and not info.get("mpp"):
            return 1.0  # level 0 without µm/px cannot have been resampled
        logger.warning(
            "%s: provenance has no level0_downsample and the slide %s cannot be opened (%s); taking the "
            "segmented level %d as level 0 (coordinates are off if it was a lower level or resampled)",
            store, source, error, level,
        )  # fmt: skip
        return 1.0
