"""Shards: the unit of work and of writing. Their geometry, the Dask description of their input blocks, and
the windows cut from one read per shard, all equal to what one read per tile gives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image, shared_file, varied_unet
from pipeline.inference.tile_batches import cut_windows, read_shard
from pipeline.slides.geometry import default_shard_tiles, make_tile_grid, tile_grid_for_model
from pipeline.slides.pyramid import open_slide
from pipeline.slides.sources import ArraySource, shard_input_blocks


@pytest.mark.parametrize("shape, tile, shard_tiles", [((1000, 700), 128, 3), ((256, 256), 64, 4), ((300, 1), 32, 2)])
def test_shards_cover_every_tile_once_and_their_boxes_tile_the_slide(shape, tile, shard_tiles):
    grid = make_tile_grid(shape, tile, halo=44, alignment=8, input_size=tile + 88, shard_tiles=shard_tiles)
    shards = grid.shards()
    assert sorted((t.row, t.col) for s in shards for t in s.tiles) == sorted((t.row, t.col) for t in grid)
    covered = np.zeros(shape, int)
    for shard in shards:
        y0, x0, y1, x1 = shard.box
        assert y0 % grid.shard_side == 0 and x0 % grid.shard_side == 0
        covered[y0:y1, x0:x1] += 1
        for tile in shard.tiles:  # every tile's valid centre lies in its shard: one writer per shard
            ty0, tx0, ty1, tx1 = tile.box
            assert y0 <= ty0 and ty1 <= y1 and x0 <= tx0 and tx1 <= x1
    assert (covered == 1).all()


def test_only_shards_with_tiles_to_run_are_listed():
    grid = make_tile_grid((512, 512), 64, halo=0, alignment=1, input_size=64, shard_tiles=4)
    run = np.zeros((8, 8), bool)
    run[5, 6] = True
    (shard,) = grid.shards(run)
    assert (shard.row, shard.col) == (1, 1) and [(t.row, t.col) for t in shard.tiles] == [(5, 6)]
    assert default_shard_tiles(256) == 16 and default_shard_tiles(8192) == 1


def _check_blocks_equal_reads(slide, grid) -> None:
    blocks = shard_input_blocks(slide.to_dask(grid.shard_side), grid)
    assert blocks.numblocks[:2] == (grid.shard_rows, grid.shard_cols)
    plan = type("Plan", (), {"slide": slide, "grid": grid})()
    for shard in grid.shards():
        block = blocks.blocks[shard.row, shard.col].compute(scheduler="sync")
        region = read_shard(plan, shard)
        assert block.shape == region.shape and np.array_equal(block, region), (shard.row, shard.col)
        windows = cut_windows(region, grid.input_box(shard.tiles)[:2], grid, shard.tiles)
        for window, tile in zip(windows, shard.tiles):  # one read per shard gives today's windows, exactly
            assert np.array_equal(window, slide.read_window(*grid.input_origin(tile), grid.input_size))


def test_dask_blocks_equal_one_read_per_shard_and_their_windows_the_per_tile_reads():
    model = varied_unet()
    image = ArraySource(random_image(700, 520, seed=3))
    _check_blocks_equal_reads(image, tile_grid_for_model(model, image.size, 128, shard_tiles=2))


@pytest.mark.parametrize("name, level", [("cmu-1-small-region.svs", 0), ("boxes-generic.tiff", 1)])
def test_dask_blocks_equal_the_shard_reads_on_real_slides(name, level):
    slide = open_slide(shared_file(f"slides/{name}"), level)
    grid = tile_grid_for_model(varied_unet(), slide.size, 64, shard_tiles=3)
    _check_blocks_equal_reads(slide, grid)
