"""(j) Nuclei instances: the out-of-core, exact instance labelling of a class map, against reading it once.

The class map is a synthetic store laid out like ``labels/segmentation/0`` (uint8, 256-px chunks in 4096-px
shards): nuclei as disks (interior class 1, radius 6 px, in a 2-px boundary rim of class 2, about one per 900
px², some touching), drawn shard by shard from centres that are the same for every shard that sees them, so
nuclei cross shard borders and corners as on a slide. It is generated once into the workdir. Timed:

* ``read once``: every block of the map read (threads, the same workers), nothing else: the floor;
* ``instances``: :func:`pipeline.analysis.instance_zarr.label_instances_zarr` with the default rule (seeds,
  ids, growth by 3 px) into a uint32 array of the same chunks and shards, as the store's finalize runs it.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np

COLUMNS = ["gigapixels", "blocks", "workers", "step", "seconds", "s per gigapixel", "Mpx/s", "× read", "instances"]
CHUNK, SHARD = 256, 4096
RADIUS, RIM, SPACING = 6, 2, 30  # px; about one nucleus per SPACING² px²
logger = logging.getLogger(__name__)


def _centres(cell: tuple[int, int], seed: int) -> np.ndarray:
    """(n, 2) nucleus centres of one shard-sized cell (global px), the same whoever asks."""
    rng = np.random.default_rng([seed, cell[0] + 1, cell[1] + 1])
    count = rng.poisson((SHARD / SPACING) ** 2)
    return rng.integers(0, SHARD, (count, 2)) + np.array(cell) * SHARD


def _shard_classes(box: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """The class map of one shard: distance to the nearest centre within reach (its own and its neighbours')."""
    from scipy import ndimage

    y0, x0, y1, x1 = box
    margin = RADIUS + RIM + 1
    cy, cx = y0 // SHARD, x0 // SHARD
    centres = np.concatenate([_centres((cy + dy, cx + dx), seed) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    local = centres - [y0 - margin, x0 - margin]
    height, width = y1 - y0 + 2 * margin, x1 - x0 + 2 * margin
    local = local[(local[:, 0] >= 0) & (local[:, 1] >= 0) & (local[:, 0] < height) & (local[:, 1] < width)]
    empty = np.ones((height, width), dtype=bool)
    empty[local[:, 0], local[:, 1]] = False
    distance = ndimage.distance_transform_edt(empty)[margin:-margin, margin:-margin]
    classes = np.zeros(distance.shape, dtype=np.uint8)
    classes[distance <= RADIUS + RIM] = 2
    classes[distance <= RADIUS] = 1
    return classes


def class_map_store(workdir: Path, gigapixels: float, seed: int = 0, workers: int | None = None):
    """The synthetic class map of about ``gigapixels`` (square, a whole number of chunks), cached in ``workdir``."""
    import zarr

    from pipeline.analysis.components import ComponentOptions, block_boxes, map_blocks

    side = max(CHUNK, round(math.sqrt(gigapixels * 1e9) / CHUNK) * CHUNK)
    path = Path(workdir) / f"instances-classes-{side}.zarr"
    if (path / "done").exists():
        return zarr.open_array(str(path), mode="r")
    shutil.rmtree(path, ignore_errors=True)
    array = zarr.create_array(str(path), shape=(side, side), chunks=(CHUNK, CHUNK), shards=(SHARD, SHARD),
                              dtype="uint8", fill_value=0, dimension_names=["y", "x"])  # fmt: skip

    def write(array, box):
        array[box[0] : box[2], box[1] : box[3]] = _shard_classes(box, seed)

    map_blocks(write, array, block_boxes((side, side), (SHARD, SHARD)), ComponentOptions(workers=workers))
    (path / "done").touch()
    return zarr.open_array(str(path), mode="r")


def _read(array, box) -> int:
    return int(np.asarray(array[box[0] : box[2], box[1] : box[3]])[0, 0])


def run(workdir: Path, gigapixels: float = 0.25, workers: int | None = None) -> dict:
    import zarr

    from pipeline.analysis.components import ComponentOptions, block_boxes, map_blocks
    from pipeline.analysis.instance_zarr import instance_block_shape, label_instances_zarr
    from pipeline.analysis.instances import InstanceRule

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    classes = class_map_store(workdir, gigapixels, workers=workers)
    logger.info("class map %s ready in %.1f s", classes.shape, time.perf_counter() - started)
    options = ComponentOptions(workers=workers)
    out_path = workdir / "instances-out.zarr"
    out = zarr.create_array(str(out_path), shape=classes.shape, chunks=classes.chunks, shards=classes.shards,
                            dtype="uint32", fill_value=0, overwrite=True)  # fmt: skip
    boxes = block_boxes(classes.shape, instance_block_shape(out, options))
    started = time.perf_counter()
    map_blocks(_read, classes, boxes, options)
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    count = label_instances_zarr(classes, out, InstanceRule(), workdir / "instances-scratch", options)
    seconds = time.perf_counter() - started
    shutil.rmtree(out_path, ignore_errors=True)
    gpx = classes.shape[0] * classes.shape[1] / 1e9
    rows = []
    for step, took, found in (("read once", read_seconds, None), ("instances (2 passes)", seconds, count)):
        rows.append([round(gpx, 3), len(boxes), options.num_workers, step, round(took, 4), round(took / gpx, 1),
                     round(gpx * 1e3 / took, 1), round(took / read_seconds, 1), found])  # fmt: skip
    notes = [(f"{classes.shape[0]}² px class map (uint8, {CHUNK}-px chunks in {SHARD}-px shards, as labels/segmentation/0), "
              f"nuclei of radius {RADIUS} px in a {RIM}-px rim, ~1 per {SPACING}² px²; blocks of one shard; default rule "
              f"(seeds of class 1, 4-connected, >= 4 px, grown 3 px into class 2); {os.cpu_count()} cores on this machine.")]
    return {"columns": COLUMNS, "rows": rows, "notes": notes, "instances": count}
