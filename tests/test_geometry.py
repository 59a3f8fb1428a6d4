"""Pure tile geometry: grid, windows on the pooling grid, equal window shapes, valid sizes, mirror indices."""

import numpy as np
import pytest

from pipeline.slides.geometry import (
    check_tile_size, forward_windows, make_tile_grid, symmetric_index, tile_grid_for_model,
)
from unet import UNet


def test_grid_covers_the_slide_once_with_edge_tiles_cropped():
    grid = make_tile_grid((1000, 700), 256, halo=44, alignment=8, input_size=348)
    assert (grid.rows, grid.cols) == (4, 3)
    covered = np.zeros((1000, 700), dtype=int)
    for tile in grid:
        y0, x0, y1, x1 = tile.box
        covered[y0:y1, x0:x1] += 1
        assert tile.y % 256 == 0 and tile.x % 256 == 0
    assert (covered == 1).all()
    assert grid.tile(3, 2).box == (768, 512, 1000, 700)


def test_input_windows_start_on_the_pooling_grid_of_the_padded_slide():
    model = UNet(base_channels=2, depth=3)
    grid = tile_grid_for_model(model, (999, 333), 64)
    for tile in grid:
        y, x = grid.input_origin(tile)
        assert (y + grid.halo) % model.alignment == 0 and (x + grid.halo) % model.alignment == 0


def test_tile_size_that_is_not_a_valid_output_computes_the_next_valid_one():
    model = UNet(base_channels=2, depth=3)  # halo 44, valid outputs are 4 mod 8
    grid = tile_grid_for_model(model, (500, 500), 256)
    assert model.output_size(grid.input_size) == 260 and grid.input_size == 348
    assert grid.crop == 0


def test_bad_tile_sizes_are_rejected_with_suggestions():
    with pytest.raises(ValueError, match="use 240 or 256"):
        check_tile_size(250, 16)
    with pytest.raises(ValueError, match="whole multiple"):
        check_tile_size(256, 16, chunk=96)
    with pytest.raises(ValueError, match="positive"):
        check_tile_size(0, 16)
    check_tile_size(512, 16, chunk=256)


@pytest.mark.parametrize("size", [1, 2, 5, 16])
def test_symmetric_index_equals_numpy_symmetric_pad_even_when_wider_than_the_image(size):
    values = np.arange(size)
    for before, after in [(0, 0), (3, 2), (92, 131), (7, 400)]:
        expected = np.pad(values, (before, after), mode="symmetric")
        assert (values[symmetric_index(np.arange(-before, size + after), size)] == expected).all()


@pytest.mark.parametrize("shape, tile, shard_tiles, k", [((1000, 700), 64, 4, 2), ((1000, 700), 64, 5, 2),
                                                         ((640, 900), 32, 6, 3), ((300, 300), 64, 2, 4)])  # fmt: skip
def test_forward_windows_run_every_tile_once_and_blocks_only_where_their_tiles_fill_them(shape, tile, shard_tiles, k):
    grid = make_tile_grid(shape, tile, halo=44, alignment=8, input_size=tile + 92, shard_tiles=shard_tiles)
    run = np.random.default_rng(k).random((grid.rows, grid.cols)) < 0.8
    blocks = 0
    for shard in grid.shards(run):
        windows = forward_windows(grid, shard, k)
        assert sorted((t.row, t.col) for w in windows for t in w.tiles) == sorted((t.row, t.col) for t in shard.tiles)
        first_row, first_col = shard.row * shard_tiles, shard.col * shard_tiles
        for window in windows:
            if window.side == tile:
                assert window.tiles[0].y == window.y and window.tiles[0].x == window.x
                continue
            blocks += 1
            row, col = window.y // tile, window.x // tile
            assert window.side == k * tile and (row - first_row) % k == 0 and (col - first_col) % k == 0
            assert row + k <= min(first_row + shard_tiles, grid.rows) and col + k <= min(first_col + shard_tiles, grid.cols)
            assert len(window.tiles) >= k * k - 1  # a block runs at most one tile nobody asked for
            assert all(row <= t.row < row + k and col <= t.col < col + k for t in window.tiles)
    assert blocks > 0 or k * 2 > shard_tiles
    shard = grid.shards(run)[0]
    assert [w.tiles for w in forward_windows(grid, shard, 1)] == [(t,) for t in shard.tiles]


@pytest.mark.parametrize("config", [{"depth": 3}, {"depth": 4}, {"depth": 2, "padding": "same"}])
def test_a_block_of_tiles_reads_the_same_reach_around_it_as_one_tile(config):
    """Forward windows of k x k tiles take their output side plus the grid's reach as input: that must be the
    model's valid input for that output, with the same crop, for every k."""
    model = UNet(base_channels=2, **config)
    for tile in (model.alignment * 4, 256):
        grid = tile_grid_for_model(model, (2000, 2000), tile)
        for k in (1, 2, 3, 4):
            side = k * tile
            if model.is_valid_padding:
                assert model.input_size_for(model.valid_output_size(side)) == side + grid.reach
            else:
                assert model.input_size_for(model.valid_output_size(side + 2 * model.halo)) == side + grid.reach
