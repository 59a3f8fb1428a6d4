"""The split of a slide into its shards' input blocks: one Dask description, executed a block at a time.

The level is a lazy Dask array over the slide's reader (OpenSlide, tifffile, Zarr), chunked at the shards'
input starts. It is mirror-padded (numpy's ``"symmetric"``, which ``dask.array.overlap`` calls ``"reflect"``)
by the halo at the top and left, and by the halo plus the last tiles' overhang at the bottom and right; cut
into shard-sized chunks; and each chunk is overlapped into its bottom and right neighbours by the windows'
reach past their shard (``input_size - tile_size``). Block (i, j) is then every input window of shard
(i, j), mirror padding included, and tests check each equals the per-tile reads.

No Dask scheduler runs on the hot path: each executor (a Ray actor or task, the in-process engine's reader
thread) computes its one block from that block's own small graph, culled from the slide's and with the
slices fused into the reads, so a shard's pixels are read once, in a few large reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.slides.geometry import Shard, TileGrid

if TYPE_CHECKING:
    import dask.array as da


def _shard_aligned_chunks(length: int, first: int, side: int) -> tuple[int, ...]:
    """Chunks of a ``length`` axis that end where the shards' input blocks begin: ``first``, then ``side``."""
    chunks = [min(first, length)]
    while sum(chunks) < length:
        chunks.append(min(side, length - sum(chunks)))
    return tuple(chunks)


def _mirror_pad(array: da.Array, axis: int, before: int, after: int) -> da.Array:
    """``np.pad(..., mode="symmetric")`` along ``axis`` in Dask, also where the pad is wider than the image.

    ``da.pad`` mirrors at most the array's own length; numpy pads wider ones by mirroring again from the
    padded edge, at most the original length per step, which is what the loop does."""
    import dask.array as da

    length = array.shape[axis]
    while before > 0 or after > 0:
        step_before, step_after = min(before, length), min(after, length)
        width = [(0, 0)] * array.ndim
        width[axis] = (step_before, step_after)
        array = da.pad(array, width, mode="symmetric")
        before, after = before - step_before, after - step_after
    return array


def check_shard_reach(grid: TileGrid) -> None:
    """Refuse shards narrower than their windows' reach past them: ``dask.array.overlap`` takes a block's
    overlap from its neighbours alone, so it needs chunks at least as deep as the overlap."""
    reach = grid.reach
    if grid.shard_side < reach:
        fewest = -(-reach // grid.tile_size)
        raise ValueError(f"shards of {grid.shard_tiles} tiles ({grid.shard_side} px) are narrower than the windows' "
                         f"reach past them ({reach} px); use at least {fewest} tiles per shard (--shard-tiles)")  # fmt: skip


def shard_input_blocks(source: Any, grid: TileGrid) -> da.Array:
    """The Dask description of the split: block (i, j) is the input region of shard (i, j), mirror padding included."""
    import dask.array as da

    check_shard_reach(grid)
    reach = grid.reach  # rows and columns a shard's windows read past its end
    level_chunks = [_shard_aligned_chunks(length, grid.shard_side - grid.halo, grid.shard_side) for length in grid.shape]
    level = da.from_array(source, chunks=(*level_chunks, (source.shape[2],)), asarray=False, lock=False, fancy=False)
    block_chunks = []
    for axis, length in enumerate(grid.shape):
        tiles = grid.rows if axis == 0 else grid.cols
        padded = tiles * grid.tile_size + reach  # from -halo to the last window's end
        level = _mirror_pad(level, axis, grid.halo, padded - grid.halo - length)
        count = -(-tiles // grid.shard_tiles)
        block_chunks.append((grid.shard_side,) * (count - 1) + (padded - (count - 1) * grid.shard_side,))
    padded_level = level.rechunk((*block_chunks, source.shape[2]))
    return da.overlap.overlap(padded_level, depth={0: (0, reach), 1: (0, reach), 2: 0}, boundary="none")


class ShardBlocks:
    """A slide's shard input blocks, each computed on its own: ``read(shard)`` -> (pixels, origin).

    The slide's graph is built and materialised once (about 0.1 s and a few MB for 15 gigapixels); each
    read culls the block's few tasks from it (under a millisecond) and runs them in this thread."""

    def __init__(self, source: Any, grid: TileGrid) -> None:
        self.grid = grid
        self.blocks = shard_input_blocks(source, grid)
        self._graph = dict(self.blocks.__dask_graph__())

    def origin(self, shard: Shard) -> tuple[int, int]:
        """Where the shard's block starts, in slide pixels: its first tile's window, ``halo`` before the shard."""
        return shard.box[0] - self.grid.halo, shard.box[1] - self.grid.halo

    def read(self, shard: Shard) -> tuple[np.ndarray, tuple[int, int]]:
        """The shard's input block, read once, and its origin."""
        from dask.array.optimization import optimize
        from dask.local import get_sync
        from dask.optimization import cull

        key = (self.blocks.name, shard.row, shard.col, 0)
        graph = optimize(cull(self._graph, [key])[0], [key])  # fuses each read's slice into the read itself
        return np.asarray(get_sync(dict(graph), key)), self.origin(shard)
