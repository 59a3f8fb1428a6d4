"""The label pyramid for viewers: levels 1..k by 2x nearest neighbour, each target shard built whole, once.

Every level is sharded like level 0, so a target shard is one writer's unit: it is computed from the 2x2
source shards below it and written in one piece (no partial-shard writes, which zarr-python cannot make
safe when concurrent). Shards of a level are independent and run in threads (decoding and encoding release
the GIL); levels run in order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import zarr

from pipeline.store.durability import sync_files

LABELS_PATH = "labels/segmentation"


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


def build_pyramid(path: str | Path, threads: int = 4) -> list[int]:
    """Fill levels 1..k of the label pyramid from the level below (``level[::2, ::2]``), shard by shard.

    Returns the levels it wrote. Memory: a few source shards per thread (16 MiB each at the default
    4096-pixel shard), whatever the slide's size. Each shard's files are synced as it is written."""
    group = zarr.open_group(f"{path}/{LABELS_PATH}", mode="r+")
    level = 1
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyramid") as pool:
        while str(level) in group:
            source, target = group[str(level - 1)], group[str(level)]
            folder, named = Path(path, LABELS_PATH, str(level)), set()

            def build(box: tuple[int, int, int, int], source=source, target=target, folder=folder, named=named) -> None:
                y0, x0, y1, x1 = box
                target[y0:y1, x0:x1] = source[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]
                sy, sx = target.shards or target.chunks
                sync_files([folder / target.metadata.encode_chunk_key((y0 // sy, x0 // sx))], folder, named)

            list(pool.map(build, shard_boxes(target)))
            level += 1
    return list(range(1, level))
