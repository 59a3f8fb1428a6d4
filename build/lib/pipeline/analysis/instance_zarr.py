"""Instances of a class-map Zarr array of any size, block by block, exactly equal to the whole-image reference.

Why: a slide's class map (gigapixels) never fits in memory, yet an instance's id must not depend on how the
map was cut. Three passes over blocks of whole output shards (each shard has one writer):

1. seeds: :func:`~pipeline.analysis.components.connected_components` of the seed class, with each block-level
   label's area and first pixel (raster key ``y * width + x``); labels touching across block borders are
   joined. Components below ``min_seed_area`` are dropped and the rest ranked by key: ids 1..N, which is the
   order ``scipy.ndimage.label`` gives on the whole image (it numbers components by their first pixel);
2. each block is labelled again (deterministic, same local ids), mapped to the final ids and written to a
   scratch uint32 array;
3. each block is grown (:func:`~pipeline.analysis.instances.grow`) from the seeds and classes of the block plus
   a halo of ``grow_steps`` px, clipped at the array's border (never mirrored): after k steps a pixel depends
   only on pixels within Chebyshev distance k, so the block's centre is exact.

Memory: a block plus its halo per worker (about 20 bytes per pixel: 330 MB for a 4096-px shard), and a few
numbers per seed component.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import zarr

from pipeline.analysis.components import (
    ComponentOptions, Components, batches_of_rows, block_boxes, connected_components, grid_of, map_blocks,
)  # fmt: skip
from pipeline.analysis.instances import NO_LABEL, InstanceRule, grow, seed_components

logger = logging.getLogger(__name__)
Box = tuple[int, int, int, int]


def final_ids(components: Components, min_seed_area: int) -> np.ndarray:
    """Final uint32 id of every block-level label (index = global label id; 0 stays 0): components with at
    least ``min_seed_area`` px, numbered 1..N by their first pixel's raster key, the others 0."""
    kept = np.flatnonzero(components.component_area >= min_seed_area)
    if len(kept) >= NO_LABEL:
        raise ValueError(f"instances: {len(kept)} seeds do not fit uint32 ids")
    ranked = kept[np.argsort(components.component_key[kept], kind="stable")]
    final = np.zeros(components.count, dtype=np.uint32)
    final[ranked] = np.arange(1, len(ranked) + 1, dtype=np.uint32)
    ids = np.zeros(len(components.label_component) + 1, dtype=np.uint32)
    ids[1:] = final[components.label_component]
    return ids


def _write_seeds(class_map, task: tuple[Box, int, int], scratch: zarr.Array, rule: InstanceRule,
                 ids: np.ndarray) -> None:  # fmt: skip
    """Pass 2 for one block (``task``: its box, its first global label - 1, its label count in pass 1): its seed
    labels again (deterministic: the same local ids), as final ids, into the scratch array."""
    box, first_label, count = task
    y0, x0, y1, x1 = box
    labels, found = seed_components(np.asarray(class_map[y0:y1, x0:x1]), rule)
    if found != count:
        raise RuntimeError(f"instances: block {box} gave {found} seed labels, {count} in pass 1 (the map changed?)")
    if count:
        lut = np.concatenate([[0], ids[first_label + 1 : first_label + count + 1]]).astype(np.uint32)
        scratch[y0:y1, x0:x1] = lut[labels]


def halo_window(box: Box, halo: int, shape: tuple[int, int]) -> Box:
    """``box`` widened by ``halo`` px on each side, clipped to the array (its border is not padded)."""
    y0, x0, y1, x1 = box
    return max(0, y0 - halo), max(0, x0 - halo), min(shape[0], y1 + halo), min(shape[1], x1 + halo)


def _grow_block(class_map, box: Box, scratch: zarr.Array, out: zarr.Array, rule: InstanceRule) -> None:
    """Pass 3 for one block: grow its seeds over block + halo, write the block's centre (zeros included, so
    stale ids never survive)."""
    y0, x0, y1, x1 = box
    wy0, wx0, wy1, wx1 = halo_window(box, rule.grow_steps, class_map.shape)
    seeds = np.asarray(scratch[wy0:wy1, wx0:wx1])
    if seeds.any():
        grown = grow(seeds, rule.growable(np.asarray(class_map[wy0:wy1, wx0:wx1])), rule.grow_steps)
        out[y0:y1, x0:x1] = grown[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    else:
        out[y0:y1, x0:x1] = np.zeros((y1 - y0, x1 - x0), dtype=np.uint32)


def instance_block_shape(out: zarr.Array, options: ComponentOptions) -> tuple[int, int]:
    """Blocks of whole shards (or chunks) of ``out``: each output file has exactly one writer."""
    return options.block_shape(tuple(out.shards or out.chunks))


def label_instances_zarr(class_map, out: zarr.Array, rule: InstanceRule, scratch: str | Path,
                         options: ComponentOptions | None = None) -> int:  # fmt: skip
    """Write the instance ids of ``class_map`` (2-D uint8, zarr or any array with ``shape``, ``chunks`` and 2-D
    slicing) into ``out`` (uint32, same shape), equal to ``label_instances(class_map[...], rule)``.

    ``scratch``: a folder for the seeds (a uint32 zarr array, removed at the end). ``options``: block side and
    workers (its connectivity is the rule's). Returns the number of instances."""
    if tuple(out.shape) != tuple(class_map.shape) or out.dtype != np.uint32:
        raise ValueError(f"instances: out must be uint32 of shape {class_map.shape}, got {out.dtype} {out.shape}")
    options = replace(options or ComponentOptions(), connectivity=rule.connectivity)
    shape, block = tuple(class_map.shape), instance_block_shape(out, options)
    started = time.perf_counter()
    components = connected_components(class_map, 256, (rule.seed_class,), options, block=block, keys=True)
    ids = final_ids(components, rule.min_seed_area)
    count = int(ids.max(initial=0))
    measured = time.perf_counter()
    seeds = zarr.create_array(str(scratch), shape=shape, chunks=out.chunks, shards=block, dtype="uint32",
                              fill_value=0, overwrite=True)  # fmt: skip
    try:
        grid, boxes = grid_of(shape, block), block_boxes(shape, block)
        per_block = np.diff(np.append(components.offsets, len(components.label_component)))
        for rows in batches_of_rows(grid, options.blocks_per_batch):
            first, last = rows.start * grid[1], rows.stop * grid[1]
            tasks = [(box, int(components.offsets[k]), int(per_block[k]))
                     for k, box in enumerate(boxes[first:last], first)]  # fmt: skip
            map_blocks(_write_seeds, class_map, tasks, options, seeds, rule, ids)
        seeded = time.perf_counter()
        for rows in batches_of_rows(grid, options.blocks_per_batch):
            batch = boxes[rows.start * grid[1] : rows.stop * grid[1]]
            map_blocks(_grow_block, class_map, batch, options, seeds, out, rule)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("instances: %d in %s px (%d blocks of %s): seeds %.2f s, ids %.2f s, growth %.2f s", count, shape,
                len(boxes), block, measured - started, seeded - measured, time.perf_counter() - seeded)  # fmt: skip
    return count

