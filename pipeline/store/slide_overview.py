"""The store's root image: the slide itself, so that a viewer opened on the store shows the mask over the slide.

NGFF 0.5 puts ``labels/`` inside an image group; with the slide at the root, ome-zarr-py, napari-ome-zarr and
vizarr find the image and its ``labels/segmentation`` together. The image is the segmented level's thumbnail
(longer side at most ``max_side``, area-filtered) and its halvings (2 x 2 means), as many levels as the label
pyramid has: a few MB next to a gigapixel slide. ``full=True`` (the job's ``--slide-image full``) writes the
segmented level itself instead, pixel for pixel, shard by shard, and its halvings: what a viewer needs to show the
slide sharp under the mask when zoomed in, at the cost of a compressed copy of the slide. Each level's scale and
translation say where its pixel centres lie in µm, in the same frame as the label pyramid (whose level k samples
every 2**k-th pixel, centres at 0), so the two line up.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

OVERVIEW_MAX_SIDE = 2048  # the root image's largest level (longer side, px)
CHUNK = 512
FULL_SHARD = 4096  # px per shard side of the full-resolution image (64 chunks: one file each)
SLIDE_IMAGES = ("overview", "full")


# How viewers should draw the slide: its three channels as red, green and blue on 0-255, added up. Without it
# napari-ome-zarr and vizarr fall back to their multichannel colours (cyan, magenta, yellow), a false-colour slide.
RGB_RENDERING = {
    "channels": [{"label": name, "color": color, "active": True, "coefficient": 1.0, "family": "linear",
                  "inverted": False, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                 for name, color in (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))],
    "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
}  # fmt: skip


def overview_levels(thumbnail: np.ndarray, count: int) -> list[np.ndarray]:
    """``thumbnail`` (h, w, C) and its 2 x 2-mean halvings, ``count`` levels in all (at least 1 px a side)."""
    levels = [thumbnail]
    while len(levels) < count:
        levels.append(halve(levels[-1]))  # a 1-px side stays 1 px
    return levels


def halve(image: np.ndarray) -> np.ndarray:
    """2 x 2 means of an (h, w, C) image, ceil(h / 2) x ceil(w / 2): an odd last row or column is doubled, so
    shapes follow the label pyramid's (which samples every other pixel)."""
    from pipeline.slides.sources import mean_2x2

    if image.shape[0] % 2 or image.shape[1] % 2:
        image = np.pad(image, [(0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)], mode="edge")
    return mean_2x2(image)


def write_full_levels(root: zarr.Group, folder: Path, slide: Any, count: int, threads: int = 4) -> None:
    """Level 0: the segmented level pixel for pixel, read shard by shard; levels 1.. : :func:`halve` of the level
    above, shard by shard; each level synced under ``folder`` (the store). Memory: a few shards per thread,
    whatever the slide's size."""
    from pipeline.store.durability import sync_tree

    channels, shape = slide.shape[2], tuple(slide.size)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="slide-image") as pool:
        for level in range(count):
            array = root.create_array(str(level), shape=(channels, *shape), dtype="uint8", overwrite=True,
                                      chunks=(channels, CHUNK, CHUNK), shards=(channels, FULL_SHARD, FULL_SHARD),
                                      dimension_names=["c", "y", "x"])  # fmt: skip
            above = root[str(level - 1)] if level else None

            def write(box: tuple[int, int, int, int], array=array, above=above) -> None:
                y0, x0, y1, x1 = box
                if above is None:
                    pixels = np.asarray(slide.read(y0, y1, x0, x1))
                    pixels = pixels[..., None] if pixels.ndim == 2 else pixels
                else:
                    pixels = halve(np.asarray(above[:, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]).transpose(1, 2, 0))
                array[:, y0:y1, x0:x1] = np.ascontiguousarray(pixels.transpose(2, 0, 1))

            boxes = [(y, x, min(y + FULL_SHARD, shape[0]), min(x + FULL_SHARD, shape[1]))
                     for y in range(0, shape[0], FULL_SHARD) for x in range(0, shape[1], FULL_SHARD)]  # fmt: skip
            list(pool.map(write, boxes))
            sync_tree(folder / str(level))
            shape = (-(-shape[0] // 2), -(-shape[1] // 2))


def write_thumbnail_levels(root: zarr.Group, slide: Any, count: int, max_side: int) -> tuple[int, int]:
    """The thumbnail (longer side ``max_side``) and its halvings, one shard (one file) per level; returns the
    thumbnail's (h, w)."""
    thumbnail = slide.thumbnail(max_side)
    if thumbnail.ndim == 2:
        thumbnail = thumbnail[..., None]
    for k, image in enumerate(overview_levels(thumbnail, count)):
        whole = tuple(-(-side // CHUNK) * CHUNK for side in image.shape[:2])
        root.create_array(str(k), data=np.ascontiguousarray(image.transpose(2, 0, 1)), overwrite=True,
                          chunks=(image.shape[2], CHUNK, CHUNK), shards=(image.shape[2], *whole),
                          dimension_names=["c", "y", "x"])  # fmt: skip
    return thumbnail.shape[:2]


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
                   max_side: int = OVERVIEW_MAX_SIDE, full: bool = False) -> None:  # fmt: skip
    """Write the root image of ``store`` from ``slide`` (the segmented view), ``count`` levels (as many as the
    label pyramid: ome-zarr-models checks they match), and its NGFF multiscales metadata. ``full``: the slide at
    full resolution instead of its thumbnail."""
    root = zarr.open_group(str(store), mode="r+")
    if full:
        write_full_levels(root, Path(store), slide, count)
        first, description = tuple(slide.size), "the slide at the segmented level, pixel for pixel, then 2 x 2 means"
    else:
        first = write_thumbnail_levels(root, slide, count, max_side)
        description = "the slide's thumbnail (area filter), then 2 x 2 means; the slide file holds the full resolution"
    transforms = level_transforms(slide.size, first, count, mpp)
    unit = {"unit": "micrometer"} if mpp else {}
    root.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [{
            "name": "slide",
            "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", **unit},
                     {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": str(k), "coordinateTransformations": t} for k, t in enumerate(transforms)],
            "type": "mean",
            "metadata": {"description": description},
        }],
        "omero": RGB_RENDERING,
    }  # fmt: skip
