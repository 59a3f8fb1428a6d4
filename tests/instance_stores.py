"""Result stores with a hand-made instance label image (``labels/nuclei``) for the analysis tests.

``touching_nuclei`` holds two nuclei of the boundary model (classes background, nucleus, nucleus boundary) that
touch: one class-1 connected component, two instances. The second crosses the borders of four 16-px chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from analysis_stores import make_store

BOUNDARY_CLASSES = ["background", "nucleus", "nucleus boundary"]
SHAPE = (48, 64)  # 3 x 4 chunks of 16 px
FIRST = (slice(4, 12), slice(4, 10))  # 8 x 6 = 48 px, its top row boundary
SECOND = (slice(6, 21), slice(10, 22))  # 15 x 12 = 180 px across chunk rows and columns, its bottom row boundary
AREAS = (48, 180)
RULE = {"name": "nuclei", "seed_class": 1, "grow_classes": [2]}


def touching_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """(class mask, instance ids) of the two touching nuclei."""
    mask, ids = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint32)
    for number, (rows, cols) in enumerate((FIRST, SECOND), start=1):
        mask[rows, cols], ids[rows, cols] = 1, number
    mask[FIRST[0].start, FIRST[1]] = 2
    mask[SECOND[0].stop - 1, SECOND[1]] = 2
    return mask, ids


def add_instances(path: str | Path, ids: np.ndarray, name: str = "nuclei") -> None:
    """Write ``ids`` as the NGFF label image ``labels/<name>`` beside labels/segmentation (same levels, shapes
    and chunks; lower levels nearest-neighbour) and list it in the labels group."""
    labels = zarr.open_group(f"{path}/labels", mode="r+")
    segmentation = labels["segmentation"]
    group = labels.create_group(name)
    levels = sorted(int(k) for k in segmentation.array_keys())
    for level in levels:
        source = segmentation[str(level)]
        group.create_array(str(level), data=ids[:: 2**level, :: 2**level], chunks=source.chunks,
                           dimension_names=["y", "x"])  # fmt: skip
    multiscales = dict(segmentation.attrs["ome"])["multiscales"]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{**multiscales[0], "name": name}], "image-label": {}}
    labels.attrs["ome"] = {**dict(labels.attrs["ome"]), "labels": ["segmentation", name]}


def make_instance_store(path: str | Path, mask: np.ndarray, ids: np.ndarray, **provenance) -> Path:
    """A complete store of the boundary model with ``ids`` as its nuclei instances (and their provenance)."""
    count = int(ids.max())
    info = {"class_names": BOUNDARY_CLASSES, "instances": {"rule": RULE, "count": count}, **provenance}
    store = make_store(path, mask, **info)
    add_instances(store, ids)
    return store
