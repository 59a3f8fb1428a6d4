"""The store's root image: the slide itself at reduced resolution, so that a viewer opened on the store shows the
mask over the slide.

NGFF 0.5 puts ``labels/`` inside an image group; with the slide at the root, ome-zarr-py, napari-ome-zarr and
vizarr find the image and its ``labels/segmentation`` together. The image is the segmented level's thumbnail
(longer side at most ``max_side``, area-filtered) and its halvings (2 x 2 means), as many levels as the label
pyramid has: a few MB next to a gigapixel slide. Each level's scale and translation say where its pixel centres lie in µm, in the same
frame as the label pyramid (whose level k samples every 2**k-th pixel, centres at 0), so the two line up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

OVERVIEW_MAX_SIDE = 2048  # the root image's largest level (longer side, px)
CHUNK = 512


def overview_levels(thumbnail: np.ndarray, count: int) -> list[np.ndarray]:
    """``thumbnail`` (h, w, C) and its 2 x 2-mean halvings, ``count`` levels in all (at least 1 px a side)."""
    from pipeline.slides.sources import mean_2x2

    levels = [thumbnail]
    while len(levels) < count:
        image = levels[-1]
        short = [(0, max(0, 2 - side)) for side in image.shape[:2]] + [(0, 0)]
        image = np.pad(image, short, mode="edge")  # a 1-px side stays 1 px
        levels.append(mean_2x2(image[: image.shape[0] // 2 * 2, : image.shape[1] // 2 * 2]))
    return levels


def level_transforms(slide_shape: tuple[int, int], first: tuple[int, int], count: int,
                     mpp: float | None) -> list[list[dict[str, Any]]]:  # fmt: skip
    """NGFF scale + translation of each overview level: pixel j of level k has its centre at a_k * j + b_k
    segmented-level pixels, a_0 = H / h (the thumbnail spans the whole level), b_0 = a_0 / 2 - 1/2, and each
    halving doubles a and adds a / 2 to b; µm when the store has a µm/px."""
    unit = mpp or 1.0
    a = [slide_shape[0] / first[0], slide_shape[1] / first[1]]
    b = [a[0] / 2 - 0.5, a[1] / 2 - 0.5]
    transforms = []
    for _ in range(count):
        transforms.append([{"type": "scale", "scale": [1.0, a[0] * unit, a[1] * unit]},
                           {"type": "translation", "translation": [0.0, b[0] * unit, b[1] * unit]}])  # fmt: skip
        b = [b[0] + a[0] / 2, b[1] + a[1] / 2]
        a = [2 * a[0], 2 * a[1]]
    return transforms


def write_overview(store: str | Path, slide: Any, mpp: float | None, count: int,
                   max_side: int = OVERVIEW_MAX_SIDE) -> None:  # fmt: skip
    """Write the root image of ``store`` from ``slide`` (the segmented view), ``count`` levels (as many as the
    label pyramid: ome-zarr-models checks they match), and its NGFF multiscales metadata."""
    thumbnail = slide.thumbnail(max_side)
    if thumbnail.ndim == 2:
        thumbnail = thumbnail[..., None]
    levels = overview_levels(thumbnail, count)
    root = zarr.open_group(str(store), mode="r+")
    for k, image in enumerate(levels):
        whole = tuple(-(-side // CHUNK) * CHUNK for side in image.shape[:2])  # one shard: one file per level
        root.create_array(str(k), data=np.ascontiguousarray(image.transpose(2, 0, 1)), overwrite=True,
                          chunks=(image.shape[2], CHUNK, CHUNK), shards=(image.shape[2], *whole),
                          dimension_names=["c", "y", "x"])  # fmt: skip
    transforms = level_transforms(slide.size, thumbnail.shape[:2], len(levels), mpp)
    unit = {"unit": "micrometer"} if mpp else {}
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": "slide",
            "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                     {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": str(k), "coordinateTransformations": t} for k, t in enumerate(transforms)],
        }],
    }  # fmt: skip
