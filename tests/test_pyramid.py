"""A slide's pyramid: its facts read once, every level read as its own raster, and clear refusals.

The reference for "a level's own raster" is one OpenSlide read of the whole level from its origin (0, 0),
which maps to a whole pixel of every level, and tifffile's read of the whole level; they agree. (Only for
levels up to 4096 px a side: OpenSlide paints larger regions in 4096-px parts, each from its own level-0
origin, so beyond that its own whole read of a non-integer level is shifted too; the levels here are smaller.)
"""

import logging
import pickle
import re

import numpy as np
import openslide
import pytest
import tifffile
import zarr

from conftest import (JPEG_LS_LOSSLESS, NON_INTEGER_LEVELS, SHARED, random_image, shared_file,
                      write_dicom_level)  # fmt: skip
from pipeline import SlideError
from pipeline.slides.geometry import make_tile_grid
from pipeline.slides.pyramid import LevelSource, open_pyramid, open_slide
from pipeline.slides.resolution import open_at_mpp
from pipeline.slides.sources import ArraySource, ResampledSource
from pipeline.slides.formats import openslide_pyramid

SHARED_SLIDES = sorted(p.name for p in (SHARED / "slides").glob("*") if p.is_file()) or ["(no shared slides)"]


def whole_level_by_openslide(path, level: int) -> np.ndarray:
    with openslide.OpenSlide(str(path)) as slide:
        width, height = slide.level_dimensions[level]
        exact_parts = max(width, height) <= 4096 or float(slide.level_downsamples[level]).is_integer()
        assert exact_parts, "beyond 4096 px OpenSlide paints a non-integer level in shifted parts"
        return np.asarray(slide.read_region((0, 0), level, (width, height)).convert("RGB"))


def assert_windows_equal_the_whole_level(view, whole: np.ndarray, tile: int = 64, halo: int = 46) -> None:
    """Every overlap-tile input window read from ``view`` equals the same window cut from ``whole``."""
    grid = make_tile_grid(view.size, tile, halo=halo, alignment=16, input_size=tile + 2 * halo)
    padded = np.pad(whole, ((halo + tile, halo + tile), (halo + tile, halo + tile), (0, 0)), mode="symmetric")
    for t in grid:
        y, x = grid.input_origin(t)
        expected = padded[y + halo + tile : y + halo + tile + grid.input_size, x + halo + tile : x + halo + tile + grid.input_size]
        assert (view.read_window(y, x, grid.input_size) == expected).all(), f"window of tile {t} differs"


# --------------------------------------------------------------------------- facts
def test_the_pyramid_holds_the_slides_facts():
    cmu = open_pyramid(shared_file("slides/cmu-1-small-region.svs"))
    assert (cmu.vendor, cmu.pixels, cmu.level_count, cmu.channels) == ("aperio", "tifffile tiles", 1, 3)
    assert cmu.levels[0].shape == (2967, 2220) and cmu.mpp == pytest.approx(0.499)
    assert cmu.associated == ("label", "macro", "thumbnail")
    assert cmu.associated_image("label").shape == (463, 387, 3)
    boxes = open_pyramid(shared_file("slides/boxes-generic.tiff"))
    with openslide.OpenSlide(str(boxes.path)) as slide:
        assert [lv.downsample for lv in boxes.levels] == list(slide.level_downsamples)  # 1, 2, 4.016, 8.086
        assert [lv.shape[::-1] for lv in boxes.levels] == list(slide.level_dimensions)
    assert boxes.level(2).mpp == pytest.approx(boxes.mpp * 4.016129)
    assert boxes.level(2).level0_downsample == pytest.approx(4.016129)


def test_a_level_view_pickles_small_and_reads_after_unpickling():
    view = open_slide(shared_file("slides/boxes-generic.tiff"), 2)
    payload = pickle.dumps(view)
    assert len(payload) < 4000  # facts only; handles reopen once per process
    assert (pickle.loads(payload).read(0, 62, 0, 75) == view.read(0, 62, 0, 75)).all()


def test_thumbnail_from_the_coarsest_level_at_least_as_big(non_integer_slide):
    pyramid = open_pyramid(non_integer_slide)
    thumb = pyramid.thumbnail(500)
    assert thumb.shape == (68, 500, 3)  # level 3 (555 px wide) is the coarsest level >= 500 px
    level3 = pyramid.level(3).read(0, 75, 0, 555).astype(float)
    assert np.abs(thumb.mean((0, 1)) - level3.mean((0, 1))).max() < 2
    assert pyramid.level(1).thumbnail(500).shape == thumb.shape  # every level's thumbnail is the slide's


# --------------------------------------------------------------------------- native pixels
@pytest.mark.parametrize("name", SHARED_SLIDES)
def test_every_level_of_the_shared_slides_reads_its_own_raster(name):
    path = shared_file(f"slides/{name}")
    pyramid = open_pyramid(path)
    for level in range(pyramid.level_count):
        whole = whole_level_by_openslide(path, level)
        assert (whole == tifffile.imread(path, level=level)).all()
        assert_windows_equal_the_whole_level(pyramid.level(level), whole, tile=32 if max(whole.shape) < 512 else 256)


def test_every_level_of_a_non_integer_pyramid_reads_its_own_raster(non_integer_slide):
    pyramid = open_pyramid(non_integer_slide)
    assert [round(lv.downsample, 4) for lv in pyramid.levels] == [1.0, 2.0019, 4.0047, 8.0094]
    assert pyramid.pixels == "tifffile tiles"
    for level, shape in enumerate(NON_INTEGER_LEVELS):
        whole = whole_level_by_openslide(non_integer_slide, level)
        assert whole.shape[:2] == shape and (whole == tifffile.imread(non_integer_slide, level=level)).all()
        assert_windows_equal_the_whole_level(pyramid.level(level), whole)


def test_openslide_region_reads_at_a_non_integer_level_are_shifted(non_integer_slide):
    """Why the pyramid does not read this level through OpenSlide: a region whose level-0 origin is
    round(x * downsample) is rendered with a sub-pixel shift, a different one per region (seams)."""
    whole = whole_level_by_openslide(non_integer_slide, 1)
    with openslide.OpenSlide(str(non_integer_slide)) as slide:
        downsample = slide.level_downsamples[1]
        differs = 0
        for x in range(256, 2048, 256):
            region = np.asarray(slide.read_region((round(x * downsample), 0), 1, (64, 64)).convert("RGB"))
            differs += not (region == whole[:64, x : x + 64]).all()
    assert differs >= 5


def test_openslide_only_formats_read_whole_number_levels_natively_and_resample_the_others(dicom_slide, caplog):
    """A DICOM WSI (OpenSlide only): level 1 (downsample 2) is its own raster through OpenSlide; level 2
    (4.14) cannot be, so it is resampled from level 1, exactly the same whatever region is read."""
    pyramid = open_pyramid(dicom_slide)
    assert (pyramid.vendor, pyramid.pixels) == ("dicom", "openslide")
    assert [lv.native for lv in pyramid.levels] == [True, True, False]
    for level in (0, 1):
        assert isinstance(pyramid.level(level), LevelSource)
        assert_windows_equal_the_whole_level(pyramid.level(level), whole_level_by_openslide(dicom_slide, level), tile=16, halo=8)
    with caplog.at_level(logging.WARNING):
        level2 = pyramid.level(2)
    assert isinstance(level2, ResampledSource) and level2.base.level == 1 and "resampled" in caplog.text
    assert level2.size == (24, 34) and level2.level0_downsample == pytest.approx(pyramid.levels[2].downsample)
    whole = level2.read(0, 24, 0, 34)
    assert_windows_equal_the_whole_level(level2, whole, tile=16, halo=8)
    assert np.abs(whole.astype(int) - whole_level_by_openslide(dicom_slide, 2)).mean() < 25  # near the scanner's
    by_mpp = open_at_mpp(dicom_slide, pyramid.level_mpp(2))  # --mpp picks among exact levels only
    assert isinstance(by_mpp, ResampledSource) and by_mpp.base.level == 1


def test_forcing_openslide_on_a_tiff_gives_the_same_pixels_where_it_can(non_integer_slide):
    """The TIFF reader is chosen per file; OpenSlide's own route reads level 0 identically."""
    forced = openslide_pyramid(non_integer_slide, "generic-tiff", None)
    assert [lv.native for lv in forced.levels] == [True, False, False, False]
    native = open_pyramid(non_integer_slide)
    assert (forced.level(0).read(100, 400, 3000, 4443) == native.level(0).read(100, 400, 3000, 4443)).all()


@pytest.mark.parametrize("layout", ["stripped", "planar", "rgba"])
def test_stripped_planar_and_rgba_tiffs_read_like_tifffile(tmp_path, layout):
    image = random_image(150, 230, seed=4)
    path = tmp_path / f"{layout}.tif"
    if layout == "stripped":
        tifffile.imwrite(path, image, rowsperstrip=7, photometric="rgb", compression="zlib")
    elif layout == "planar":
        tifffile.imwrite(path, np.moveaxis(image, -1, 0), tile=(32, 32), photometric="rgb", planarconfig="separate")
    else:
        alpha = np.full((150, 230, 1), 255, np.uint8)
        alpha[:40] = 0  # transparent rows become white, as OpenSlide composites them
        tifffile.imwrite(path, np.concatenate([image, alpha], -1), tile=(64, 64), photometric="rgb", extrasamples=[2])
        image = image.copy()
        image[:40] = 255
    view = open_slide(path)
    assert view.shape == (150, 230, 3) and view.pixels.endswith("level 0, tifffile tiles")
    assert_windows_equal_the_whole_level(view, image, tile=32, halo=20)


def test_ome_zarr_multiscale_levels_and_pixel_size(tmp_path):
    image = random_image(120, 90, seed=6)
    group = zarr.open_group(str(tmp_path / "img.zarr"), mode="w")
    group.create_array("s0", data=image, chunks=(32, 32, 3))
    group.create_array("s1", data=image[::2, ::2].copy(), chunks=(32, 32, 3))
    axes = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"},
            {"name": "c", "type": "channel"}]  # fmt: skip
    datasets = [{"path": f"s{k}", "coordinateTransformations": [{"type": "scale", "scale": [0.25 * 2**k] * 2 + [1]}]}
                for k in range(2)]  # fmt: skip
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    pyramid = open_pyramid(tmp_path / "img.zarr")
    assert pyramid.mpp == 0.25 and [lv.shape for lv in pyramid.levels] == [(120, 90), (60, 45)]
    assert (pyramid.level(1).read(0, 60, 0, 45) == image[::2, ::2]).all()


# --------------------------------------------------------------------------- refusals, one line each
def refusal(source) -> str:
    with pytest.raises(SlideError) as caught:
        open_slide(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_a_multiplexed_fluorescence_tiff_says_how_many_channels_it_has(tmp_path):
    pages = tmp_path / "cycif.tif"  # 40 stripped pages of 108 x 192 px: once reported as "192 channels"
    tifffile.imwrite(pages, np.zeros((40, 108, 192), np.uint8))
    message = refusal(pages)
    assert message.startswith(str(pages)) and "40 image planes" in message and "RGB" in message
    assert "192 channels" not in message
    ome = tmp_path / "panel.ome.tif"
    tifffile.imwrite(ome, np.zeros((5, 64, 96), np.uint8), metadata={"axes": "CYX"}, tile=(32, 32))
    assert re.search(r"panel.ome.tif: 5 channels \(axes CYX, 96x64 px\).*RGB", refusal(ome))


@pytest.mark.parametrize("dtype, value", [(np.uint16, 65535), (np.float32, 1.0)])
def test_a_deep_image_says_so_and_its_conversion_advice_works(tmp_path, dtype, value):
    image = np.full((32, 48, 3), value, dtype)
    if dtype == np.uint16:
        path = tmp_path / "deep.tif"
        tifffile.imwrite(path, image, tile=(16, 16), photometric="rgb")
        message = refusal(path)
        assert message.startswith(str(path)) and "16-bit pixels (uint16)" in message
    else:
        message = refusal(image)
        assert "float32 pixels" in message
    advice = re.search(r"e\.g\. (.+?\.astype\(np\.uint8\))", message).group(1)
    converted = eval(advice, {"np": np, "x": image})  # the advice, run as given: white stays white
    assert converted.dtype == np.uint8 and (converted == 255).all()


def test_a_dicom_slide_openslide_cannot_decode_names_its_transfer_syntax(tmp_path):
    path = write_dicom_level(tmp_path / "jpegls.dcm", random_image(32, 32), "1.2.3.4", mpp=0.25, syntax=JPEG_LS_LOSSLESS)
    assert openslide.OpenSlide.detect_format(str(path)) == "dicom"
    message = refusal(path)
    assert message.startswith(str(path)) and f"JPEG-LS lossless (transfer syntax {JPEG_LS_LOSSLESS})" in message
    assert "re-encode it as JPEG baseline" in message


def test_a_truncated_tiff_is_refused_at_open_not_mid_run(tmp_path):
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, random_image(256, 256), tile=(64, 64), photometric="rgb", compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    message = refusal(cut)
    assert message.startswith(str(cut)) and "truncated" in message


def test_arrays_and_views_are_one_level_pyramids():
    image = random_image(40, 50)
    pyramid = open_pyramid(image, mpp=0.5)
    assert pyramid.level_count == 1 and pyramid.mpp == 0.5 and isinstance(pyramid.level(0), ArraySource)
    view = open_slide(image)
    assert open_slide(view) is view and open_pyramid(view).level(0) is view
    with pytest.raises(SlideError, match="level 1 does not exist"):
        open_slide(image, level=1)
