"""Instances of a class-map Zarr array of any size, block by block, exactly equal to the whole-image reference.

Why: a slide's class map (gigapixels) never fits in memory, yet an instance's id must not depend on how the
map was cut. Two passes over blocks of whole output shards (each shard has one writer):

1. seeds: :func:`~pipeline.analysis.components.connected_components` of the seed class, with each block-level
   label's area and first pixel (raster key ``y * width + x``); labels touching across block borders are
   joined. Components below ``min_seed_area`` are dropped and the rest ranked by key: ids 1..N, which is the
   order ``scipy.ndimage.label`` gives on the whole image (it numbers components by their first pixel). Each
   block also leaves its edge strips (``grow_steps`` px of its labels along each side) in a scratch folder;
2. each block is labelled again (deterministic: the same local ids), its seeds mapped to their final ids, its
   halo of ``grow_steps`` px filled from its neighbours' strips (mapped the same way), and grown
   (:func:`~pipeline.analysis.instances.grow`) over block + halo, clipped at the array's border (never
   mirrored): after k steps a pixel depends only on pixels within Chebyshev distance k, so the block's centre
   is exact. Only the block's centre is written.

Memory: a block plus its halo per worker (about 20 bytes per pixel: 330 MB for a 4096-px shard), a few numbers
per seed component; on disk, 4 bytes per px of block perimeter per grow step (the strips, int32).
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


class EdgeStrips:
    """Each block's ``depth`` px of local seed labels along its four sides, one ``.npz`` per block in ``folder``:
    what a neighbour's halo needs of it in pass 2, without writing the whole label image anywhere."""

    def __init__(self, folder: Path, depth: int) -> None:
        self.folder, self.depth = Path(folder), depth
        self.folder.mkdir(parents=True, exist_ok=True)

    def _file(self, box: Box) -> Path:
        return self.folder / f"{box[0]}-{box[1]}.npz"

    def save(self, box: Box, labels: np.ndarray) -> None:
        d = self.depth
        np.savez(self._file(box), top=labels[:d], bottom=labels[-d:], left=labels[:, :d], right=labels[:, -d:])

    def region(self, box: Box, side: str, window: Box) -> tuple[np.ndarray, Box]:
        """The strip of ``box`` on ``side`` cut to ``window``: (local labels, their box in array px)."""
        y0, x0, y1, x1 = box
        with np.load(self._file(box)) as strips:
            strip = strips[side]
        sy0 = y1 - strip.shape[0] if side == "bottom" else y0
        sx0 = x1 - strip.shape[1] if side == "right" else x0
        oy0, ox0 = max(sy0, window[0]), max(sx0, window[1])
        oy1, ox1 = min(sy0 + strip.shape[0], window[2]), min(sx0 + strip.shape[1], window[3])
        return strip[oy0 - sy0 : oy1 - sy0, ox0 - sx0 : ox1 - sx0], (oy0, ox0, oy1, ox1)


def halo_window(box: Box, halo: int, shape: tuple[int, int]) -> Box:
    """``box`` widened by ``halo`` px on each side, clipped to the array (its border is not padded)."""
    y0, x0, y1, x1 = box
    return max(0, y0 - halo), max(0, x0 - halo), min(shape[0], y1 + halo), min(shape[1], x1 + halo)


class BlockIds:
    """Final ids of each block's local seed labels: block ``k``'s label ``j`` is ``ids[offsets[k] + j]``."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, per_block: np.ndarray) -> None:
        self.ids, self.offsets, self.per_block = ids, offsets, per_block

    def table(self, block: int) -> np.ndarray:
        first, count = int(self.offsets[block]), int(self.per_block[block])
        return np.concatenate([[0], self.ids[first + 1 : first + count + 1]]).astype(np.uint32)


# which strip of a neighbour at (row step, column step) lies in the halo: the side facing the block
FACING = {(-1, -1): "bottom", (-1, 0): "bottom", (-1, 1): "bottom", (0, -1): "right", (0, 1): "left",
          (1, -1): "top", (1, 0): "top", (1, 1): "top"}  # fmt: skip


def _label_block(class_map, task: tuple[int, Box], out: zarr.Array, rule: InstanceRule, grid: tuple[int, int],
                 boxes: list[Box], block_ids: BlockIds, strips: EdgeStrips) -> None:  # fmt: skip
    """Pass 2 for one block (``task``: its row-major index and box): its seeds (labelled again, mapped to final
    ids) and its neighbours' strips in the halo, grown; the block's centre written (zeros included, so stale
    ids never survive)."""
    k, box = task
    y0, x0, y1, x1 = box
    window = halo_window(box, rule.grow_steps, class_map.shape)
    wy0, wx0, wy1, wx1 = window
    classes = np.asarray(class_map[wy0:wy1, wx0:wx1])
    labels, found = seed_components(classes[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0], rule)
    if found != block_ids.per_block[k]:
        raise RuntimeError(f"instances: block {box} gave {found} seed labels, {block_ids.per_block[k]} in pass 1 "
                           "(the map changed?)")  # fmt: skip
    seeds = np.zeros(classes.shape, dtype=np.uint32)
    seeds[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] = block_ids.table(k)[labels]
    row, col = divmod(k, grid[1])
    for (dr, dc), side in FACING.items():
        r, c = row + dr, col + dc
        if window == box or not (0 <= r < grid[0] and 0 <= c < grid[1]):  # no halo (0 grow steps), or no neighbour
            continue
        neighbour = r * grid[1] + c
        local, (oy0, ox0, oy1, ox1) = strips.region(boxes[neighbour], side, window)
        if local.size:
            seeds[oy0 - wy0 : oy1 - wy0, ox0 - wx0 : ox1 - wx0] = block_ids.table(neighbour)[local]
    if seeds.any():
        grown = grow(seeds, rule.growable(classes), rule.grow_steps)
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

    ``scratch``: a folder for the blocks' edge strips (removed at the end). ``options``: block side and
    workers (its connectivity is the rule's). Returns the number of instances."""
    if tuple(out.shape) != tuple(class_map.shape) or out.dtype != np.uint32:
        raise ValueError(f"instances: out must be uint32 of shape {class_map.shape}, got {out.dtype} {out.shape}")
    options = replace(options or ComponentOptions(), connectivity=rule.connectivity)
    shape, block = tuple(class_map.shape), instance_block_shape(out, options)
    started = time.perf_counter()
    strips = EdgeStrips(Path(scratch), max(1, rule.grow_steps))
    try:
        components = connected_components(class_map, 256, (rule.seed_class,), options, block=block, keys=True,
                                          labels_hook=strips.save)  # fmt: skip
        ids = final_ids(components, rule.min_seed_area)
        count = int(ids.max(initial=0))
        per_block = np.diff(np.append(components.offsets, len(components.label_component)))
        block_ids = BlockIds(ids, components.offsets, per_block)
        measured = time.perf_counter()
        grid, boxes = grid_of(shape, block), block_boxes(shape, block)
        for rows in batches_of_rows(grid, options.blocks_per_batch):
            first, last = rows.start * grid[1], rows.stop * grid[1]
            tasks = list(enumerate(boxes[first:last], first))
            map_blocks(_label_block, class_map, tasks, options, out, rule, grid, boxes, block_ids, strips)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("instances: %d in %s px (%d blocks of %s): seeds %.2f s, ids and growth %.2f s", count, shape,
                len(boxes), block, measured - started, time.perf_counter() - measured)  # fmt: skip
    return count
