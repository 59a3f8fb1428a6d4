"""Shards: the unit of work and of writing. Their geometry, the Dask description of their input blocks, and
the windows cut from one read per shard, all equal to what one read per tile gives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image, shared_file, varied_unet
from pipeline.inference.tile_batches import cut_windows, read_shard
from pipeline.slides.geometry import default_shard_tiles, make_tile_grid, tile_grid_for_model
from pipeline.slides.pyramid import open_slide
from pipeline.slides.shard_blocks import ShardBlocks
from pipeline.slides.sources import ArraySource


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
    """Each Dask block is the slide's mirrored region at its origin, and the windows cut from it are the
    per-tile reads, exactly (read_region and read_window mirror with numpy's np.pad "symmetric")."""
    blocks = ShardBlocks(slide, grid)
    assert blocks.blocks.numblocks[:2] == (grid.shard_rows, grid.shard_cols)
    plan = type("Plan", (), {"slide": slide, "grid": grid})()
    for shard in grid.shards():
        region, origin = read_shard(plan, shard, blocks)
        whole = blocks.blocks.blocks[shard.row, shard.col].compute(scheduler="sync")  # Dask's own scheduler agrees
        assert np.array_equal(region, whole), (shard.row, shard.col)
        assert origin == (shard.box[0] - grid.halo, shard.box[1] - grid.halo)
        assert np.array_equal(region, slide.read_region(*origin, *region.shape[:2]))
        windows = cut_windows(region, origin, grid, shard.tiles)
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


@pytest.mark.parametrize("shape", [(5, 7), (40, 3), (300, 260)])
def test_dask_blocks_mirror_like_numpy_even_past_a_slide_smaller_than_the_halo(shape):
    image = ArraySource(random_image(*shape, seed=5))
    grid = make_tile_grid(shape, 32, halo=20, alignment=4, input_size=76, shard_tiles=3)
    _check_blocks_equal_reads(image, grid)


def test_shards_narrower_than_the_windows_reach_are_refused_with_advice():
    grid = make_tile_grid((200, 200), 16, halo=20, alignment=4, input_size=56, shard_tiles=1)
    with pytest.raises(ValueError, match="narrower than the windows' reach.*at least 3 tiles per shard"):
        ShardBlocks(ArraySource(random_image(200, 200)), grid)
