"""Slide access: every source kind gives the same pixels, lazily, mirrored the same way, with clear errors."""

import numpy as np
import pytest
import tifffile
import zarr

from conftest import random_image, shared_file
from pipeline import SlideError, make_tile_grid, open_slide
from pipeline.inference.tile_batches import cut_windows
from pipeline.slides.shard_blocks import ShardBlocks


def test_numpy_zarr_tiff_and_dask_sources_read_the_same_pixels(tmp_path):
    image = random_image(150, 230)
    zarr.save_array(str(tmp_path / "img.zarr"), image)
    tifffile.imwrite(tmp_path / "img.tif", image, tile=(64, 64), photometric="rgb")
    sources = [open_slide(image), open_slide(tmp_path / "img.zarr"), open_slide(tmp_path / "img.tif")]
    sources.append(open_slide(sources[0].to_dask(64)))
    for source in sources:
        assert source.shape == (150, 230, 3)
        assert (source.read(10, 90, 20, 220) == image[10:90, 20:220]).all()
        window = source.read_window(-40, 200, 96)
        assert (window == np.pad(image, ((40, 0), (0, 66), (0, 0)), mode="symmetric")[0:96, 200:296]).all()


def test_dask_input_windows_equal_the_direct_reads():
    image = random_image(70, 90)
    source = open_slide(image)
    grid = make_tile_grid((70, 90), 32, halo=20, alignment=4, input_size=76, shard_tiles=2)
    blocks = ShardBlocks(source, grid)
    windows = np.stack([cut_windows(*blocks.read(s), grid, [t])[0] for s in grid.shards() for t in s.tiles])
    direct = np.stack([source.read_window(*grid.input_origin(t), 76) for s in grid.shards() for t in s.tiles])
    assert windows.shape == (len(grid), 76, 76, 3) and (windows == direct).all()


def test_openslide_levels_and_mpp():
    path = shared_file("slides/boxes-generic.tiff")
    assert open_slide(path, level=0).size == (250, 300)
    level2 = open_slide(path, level=2)
    assert level2.size == (62, 75) and level2.read(0, 62, 0, 75).shape == (62, 75, 3)
    svs = open_slide(shared_file("slides/cmu-1-small-region.svs"))
    assert svs.size == (2967, 2220) and svs.mpp == pytest.approx(0.499)
    with pytest.raises(SlideError, match="level 9 does not exist"):
        open_slide(path, level=9)


def test_bad_slides_get_one_line_errors_naming_the_file(tmp_path):
    with pytest.raises(SlideError, match="unopenable.tiff: .*cannot"):
        open_slide(shared_file("slides/bad/unopenable.tiff"))
    with pytest.raises(SlideError, match="unreadable.svs: reading level 0 region"):
        open_slide(shared_file("slides/bad/unreadable.svs")).read(0, 16, 0, 16)
    with pytest.raises(SlideError, match="nope.svs: no such slide"):
        open_slide(tmp_path / "nope.svs")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SlideError, match=r"notes.txt: not a slide \("):
        open_slide(tmp_path / "notes.txt")
    with pytest.raises(SlideError, match="uint8"):
        open_slide(np.zeros((4, 4, 3), dtype=np.float32))
