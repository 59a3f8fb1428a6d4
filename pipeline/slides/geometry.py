"""Tile geometry as pure functions: the tile grid, each tile's input window and its valid centre.

Invariants that make the tiled mosaic equal to one pass over the whole mirror-padded slide
(design notes section 1):
  * each tile's input is its output window grown by the model's ``halo`` on every side;
  * tile origins are multiples of the tile size, itself a multiple of ``alignment`` (2**depth), so every
    input window starts on the pooling grid of the slide padded by ``halo``;
  * every tile's window has the same shape (edge tiles are computed full size and cropped to the slide); a
    forward window of k x k tiles is the same construction for an output k times as wide;
  * pixels outside the slide are numpy ``"symmetric"`` mirror images (:func:`symmetric_index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One output tile: ``row``/``col`` in the grid, ``y``/``x`` its origin in slide pixels."""

    row: int
    col: int
    y: int
    x: int
    height: int  # valid rows inside the slide (< tile_size only on the last row of tiles)
    width: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) of the tile's valid region in slide pixels."""
        return self.y, self.x, self.y + self.height, self.x + self.width


@dataclass(frozen=True)
class TileGrid:
    """How a slide of ``shape`` is cut into tiles for a model with ``halo`` and ``alignment``.

    ``input_size`` is the side of every tile's input window; the model's output for it is at least
    ``tile_size``; the tile's valid centre is ``output[crop : crop + tile_size]`` on both axes.
    """

    shape: tuple[int, int]
    tile_size: int
    halo: int
    alignment: int
    input_size: int
    crop: int
    shard_tiles: int = 1  # tiles per side of a shard: the store's writer unit and the executors' work unit

    @property
    def rows(self) -> int:
        return -(-self.shape[0] // self.tile_size)

    @property
    def cols(self) -> int:
        return -(-self.shape[1] // self.tile_size)

    def __len__(self) -> int:
        return self.rows * self.cols

    def tile(self, row: int, col: int) -> Tile:
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside a {self.rows}x{self.cols} grid")
        y, x = row * self.tile_size, col * self.tile_size
        return Tile(row, col, y, x, min(self.tile_size, self.shape[0] - y), min(self.tile_size, self.shape[1] - x))

    def __iter__(self) -> Iterator[Tile]:
        for row in range(self.rows):
            for col in range(self.cols):
                yield self.tile(row, col)

    def input_origin(self, tile: Tile) -> tuple[int, int]:
        """Top-left of the tile's input window in slide pixels (negative at the top/left border)."""
        return tile.y - self.halo, tile.x - self.halo

    @property
    def reach(self) -> int:
        """Input pixels a window holds beyond its output (the halo on both sides, plus the valid output's
        rounding): the same for every output side that is a multiple of ``tile_size``."""
        return self.input_size - self.tile_size

    @property
    def shard_side(self) -> int:
        """Side of a shard in output pixels (the Zarr shard shape of the stored levels)."""
        return self.shard_tiles * self.tile_size

    @property
    def shard_rows(self) -> int:
        return -(-self.rows // self.shard_tiles)

    @property
    def shard_cols(self) -> int:
        return -(-self.cols // self.shard_tiles)

    def shard(self, row: int, col: int, run: np.ndarray | None = None) -> Shard:
        """Shard (``row``, ``col``) with the tiles to run in it: all, or those where ``run`` (rows, cols) is set."""
        if not (0 <= row < self.shard_rows and 0 <= col < self.shard_cols):
            raise IndexError(f"shard ({row}, {col}) outside a {self.shard_rows}x{self.shard_cols} shard grid")
        k = self.shard_tiles
        tiles = tuple(self.tile(r, c) for r in range(row * k, min(row * k + k, self.rows))
                      for c in range(col * k, min(col * k + k, self.cols)) if run is None or run[r, c])  # fmt: skip
        y, x = row * self.shard_side, col * self.shard_side
        box = (y, x, min(y + self.shard_side, self.shape[0]), min(x + self.shard_side, self.shape[1]))
        return Shard(row, col, box, tiles)

    def shards(self, run: np.ndarray | None = None) -> list[Shard]:
        """Every shard that has a tile to run (``run``: a (rows, cols) mask; None: every tile), row by row."""
        shards = (self.shard(r, c, run) for r in range(self.shard_rows) for c in range(self.shard_cols))
        return [shard for shard in shards if shard.tiles]


@dataclass(frozen=True)
class Shard:
    """A block of ``shard_tiles`` x ``shard_tiles`` tiles: written whole, once, by one writer; run as one unit.

    ``box``: (y0, x0, y1, x1) of its output region inside the slide; ``tiles``: its tiles to run (tissue)."""

    row: int
    col: int
    box: tuple[int, int, int, int]
    tiles: tuple[Tile, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


@dataclass(frozen=True)
class ForwardWindow:
    """The output block of one forward pass: ``tiles`` (one tile, or a block of k x k tiles of one shard) at
    ``y``/``x`` in slide pixels, ``side`` pixels a side. Its input is the block grown by the grid's reach, as
    a tile's is; the block's origin is a tile's, so the output is the whole-image pass's, as for a tile."""

    y: int
    x: int
    side: int
    tiles: tuple[Tile, ...]


def forward_windows(grid: TileGrid, shard: Shard, forward_tiles: int) -> list[ForwardWindow]:
    """The shard's tiles to run, as forward windows: a block of ``forward_tiles`` x ``forward_tiles`` tiles
    (aligned on the shard's first tile, inside the slide's tile grid) is one window when at most one of its
    tiles is not to run, every other tile is a window of its own; blocks first, then single tiles.

    Why: tiles stay the unit of storage, tissue skipping and resume, but one bigger window repeats less halo
    (2 x 2 tiles of 256: 604^2 px in for 512^2 out, where four windows read 4 x 348^2) and ran 1.17-1.25x
    faster per output pixel on this project's CPU (docs/performance.md). With 2 x 2 and one tile not run,
    the block reads the pixels of its three tiles alone (604^2 ~ 3 x 348^2)."""
    k = int(forward_tiles)
    if k < 1:
        raise ValueError(f"forward_tiles must be a positive whole number, got {forward_tiles}")
    if k == 1:
        return [ForwardWindow(t.y, t.x, grid.tile_size, (t,)) for t in shard.tiles]
    first_row, first_col = shard.row * grid.shard_tiles, shard.col * grid.shard_tiles
    last_row = min(first_row + grid.shard_tiles, grid.rows)
    last_col = min(first_col + grid.shard_tiles, grid.cols)
    to_run = {(t.row, t.col): t for t in shard.tiles}
    blocks, grouped = [], set()
    for row in range(first_row, last_row - k + 1, k):
        for col in range(first_col, last_col - k + 1, k):
            cells = [(r, c) for r in range(row, row + k) for c in range(col, col + k)]
            tiles = tuple(to_run[cell] for cell in cells if cell in to_run)
            if len(tiles) >= k * k - 1:
                blocks.append(ForwardWindow(row * grid.tile_size, col * grid.tile_size, k * grid.tile_size, tiles))
                grouped.update(cells)
    singles = [ForwardWindow(t.y, t.x, grid.tile_size, (t,)) for t in shard.tiles if (t.row, t.col) not in grouped]
    return blocks + singles


def check_tile_size(tile_size: int, alignment: int, chunk: int | None = None) -> None:
    """Reject tile sizes that would break exactness or the one-writer-per-chunk rule, suggesting valid ones."""
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if tile_size % alignment:
        lower = max(alignment, tile_size // alignment * alignment)
        raise ValueError(
            f"tile_size {tile_size} is not a multiple of the model's alignment {alignment} (2**depth); "
            f"use {lower} or {lower + alignment}"
        )
    if chunk is not None and tile_size % chunk:
        lower = max(chunk, tile_size // chunk * chunk)
        raise ValueError(
            f"tile_size {tile_size} must equal the output chunk {chunk} or be a whole multiple of it, "
            f"so that every chunk has exactly one writer; use {lower} or {lower + chunk}"
        )
    if chunk is not None and chunk % alignment and chunk != tile_size:
        raise ValueError(f"chunk {chunk} must be a multiple of the model's alignment {alignment}")


def make_tile_grid(
    shape: tuple[int, int],
    tile_size: int,
    *,
    halo: int,
    alignment: int,
    input_size: int,
    crop: int = 0,
    chunk: int | None = None,
    shard_tiles: int = 1,
) -> TileGrid:
    """Pure constructor: everything from numbers, no model needed (see :func:`tile_grid_for_model`)."""
    height, width = (int(v) for v in shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"slide shape must be positive, got {shape}")
    check_tile_size(tile_size, alignment, chunk)
    if input_size < tile_size + 2 * halo:
        raise ValueError(f"input_size {input_size} is smaller than tile_size + 2*halo = {tile_size + 2 * halo}")
    if int(shard_tiles) != shard_tiles or shard_tiles < 1:
        raise ValueError(f"shard_tiles must be a positive whole number of tiles, got {shard_tiles}")
    return TileGrid((height, width), int(tile_size), int(halo), int(alignment), int(input_size), int(crop),
                    int(shard_tiles))


def tile_grid_for_model(model, shape: tuple[int, int], tile_size: int, chunk: int | None = None,
                        shard_tiles: int = 1) -> TileGrid:
    """The grid for ``model`` (anything with ``halo``, ``alignment``, ``valid_output_size``, ``input_size_for``).

    A valid U-Net computes the smallest valid output >= tile_size (fed input = that + 2*halo) and keeps
    the first ``tile_size`` pixels; feeding a nearby invalid size would silently misalign the skip crops.
    A padded ("same") U-Net is fed tile_size + 2*halo rounded up to the alignment and keeps its centre.
    """
    check_tile_size(tile_size, model.alignment, chunk)
    if model.is_valid_padding:
        input_size = model.input_size_for(model.valid_output_size(tile_size))
        crop = 0
    else:
        input_size = model.input_size_for(model.valid_output_size(tile_size + 2 * model.halo))
        crop = model.halo
    return make_tile_grid(
        shape, tile_size, halo=model.halo, alignment=model.alignment, input_size=input_size, crop=crop, chunk=chunk,
        shard_tiles=shard_tiles,
    )


def symmetric_index(index: np.ndarray, size: int) -> np.ndarray:
    """Map coordinates outside [0, size) into it as ``np.pad(mode="symmetric")`` does, for any distance.

    The edge pixel is repeated (``1 0 | 0 1 2 | 2 1``); mirroring repeats with period 2*size, which is
    what np.pad does when the pad is wider than the image (slides smaller than the halo).
    """
    folded = np.mod(index, 2 * size)
    return np.where(folded < size, folded, 2 * size - 1 - folded)


def window_source(origin: int, length: int, size: int) -> tuple[int, int, np.ndarray]:
    """For a window [origin, origin + length) along an axis of ``size`` pixels: the source span
    [lo, hi) to read and the indices into that span that produce the mirrored window."""
    index = symmetric_index(np.arange(origin, origin + length), size)
    lo, hi = int(index.min()), int(index.max()) + 1
    return lo, hi, index - lo


SHARD_SIDE = 4096  # default shard side in output pixels: ~60 shards per gigapixel, 16 MiB of labels each


def default_shard_tiles(tile_size: int) -> int:
    """Tiles per shard side for a shard of about ``SHARD_SIDE`` pixels (at least one tile)."""
    return max(1, SHARD_SIDE // tile_size)
