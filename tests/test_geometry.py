"""Pure tile geometry: grid, windows on the pooling grid, equal window shapes, valid sizes, mirror indices."""

import numpy as np
import pytest

from pipeline.slides.geometry import check_tile_size, make_tile_grid, symmetric_index, tile_grid_for_model
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
