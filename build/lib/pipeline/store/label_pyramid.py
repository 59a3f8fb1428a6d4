"""The label pyramid for viewers: levels 1..k by 2x nearest neighbour, each shard written whole, once.

Levels 1..``shard_levels`` are written with each level-0 shard, by its writer: their shards are the level-0
shard's side halved per level, so level-0 shard (i, j) maps onto shard (i, j) of each of them (one writer per
shard, no partial-shard writes, which zarr-python cannot make safe when concurrent), and they cost nothing
after the last tile. Coarser levels are built after the last shard from the level below, a shard of the
full side at a time, in threads; by then they hold 1/16 of the pixels or fewer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zarr

from pipeline.store.durability import sync_files

LABELS_PATH = "labels/segmentation"
SHARD_PYRAMID_LEVELS = 2  # levels written with each shard: each saves reading the level below at the end, costs a file


def shard_levels(shard_side: int, chunk: int, levels: int) -> int:
    """How many pyramid levels (1..n) are written with each level-0 shard: their shard side, halved per level,
    must stay a whole number of chunks."""
    count = 0
    while count < min(SHARD_PYRAMID_LEVELS, levels - 1):
        side = shard_side >> (count + 1)
        if side < chunk or side % chunk or (shard_side % (2 ** (count + 1))):
            break
        count += 1
    return count


def level_shard_side(shard_side: int, level: int, written_with_shards: int) -> int:
    """The shard side of ``level``: halved per level while written with level-0 shards, else the full side."""
    return shard_side >> level if level <= written_with_shards else shard_side


def pyramid_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """Level shapes, halving until the whole level fits in one chunk."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > chunk:
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    return shapes


def shard_boxes(array: zarr.Array) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) of every shard (or chunk, if unsharded) of a 2-D array, clipped to its shape."""
    (height, width), (sy, sx) = array.shape, array.shards or array.chunks
    return [(y, x, min(y + sy, height), min(x + sx, width)) for y in range(0, height, sy) for x in range(0, width, sx)]


def build_pyramid(path: str | Path, threads: int = 4, first: int = 1, labels: str = LABELS_PATH) -> list[int]:
    """Fill levels ``first``..k of the label pyramid ``labels`` (a label image of the store) from the level below
    (``level[::2, ::2]``: ids are sampled, never averaged), shard by shard.

    Returns the levels it wrote. Memory: a few source shards per thread (16 MiB each at the default
    4096-pixel shard), whatever the slide's size. Each shard's files are synced as it is written."""
    group = zarr.open_group(f"{path}/{labels}", mode="r+")
    level = first
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyramid") as pool:
        while str(level) in group:
            source, target = group[str(level - 1)], group[str(level)]
            folder, named = Path(path, labels, str(level)), set()

            def build(box: tuple[int, int, int, int], source=source, target=target, folder=folder, named=named) -> None:
                y0, x0, y1, x1 = box
                target[y0:y1, x0:x1] = source[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]
                sy, sx = target.shards or target.chunks
                sync_files([folder / target.metadata.encode_chunk_key((y0 // sy, x0 // sx))], folder, named)

            list(pool.map(build, shard_boxes(target)))
            level += 1
    return list(range(first, level))
