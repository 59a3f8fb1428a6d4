"""Resolution by µm/px: level choice, resampling that keeps tiling exact, slides without µm/px."""

import logging

import numpy as np
import pytest

from conftest import random_image, shared_file, varied_unet
from pipeline import open_slide, segment_slide, tiled_logits, whole_image_logits
from pipeline.slides.resolution import ResampledSource, level_for_mpp, open_at_mpp, open_for_segmentation


def test_level_whose_mpp_is_closest_at_or_below_the_target():
    mpps = [0.25, 0.5, 1.0, 2.0]
    assert level_for_mpp(mpps, 0.6) == 1
    assert level_for_mpp(mpps, 1.0) == 2
    assert level_for_mpp(mpps, 0.1) == 0  # nothing fine enough: the finest there is


def test_resampled_view_reads_consistently_and_tiles_exactly():
    slide = open_at_mpp(shared_file("slides/cmu-1-small-region.svs"), 0.75)
    assert isinstance(slide, ResampledSource) and slide.mpp == pytest.approx(0.75)
    assert slide.size == (int(2967 / (0.75 / 0.499)), int(2220 / (0.75 / 0.499)))
    whole = slide.read(0, slide.size[0], 0, slide.size[1])
    assert (slide.read(101, 388, 7, 250) == whole[101:388, 7:250]).all()
    model = varied_unet()
    assert np.abs(tiled_logits(slide, model, 128) - whole_image_logits(model, whole)).max() <= 1e-4


def test_target_within_tolerance_uses_the_level_as_is():
    slide = open_at_mpp(shared_file("slides/cmu-1-small-region.svs"), 0.5)
    assert not isinstance(slide, ResampledSource) and slide.level == 0


def test_slide_without_mpp_falls_back_to_level_zero_with_a_warning(tmp_path, caplog):
    image = random_image(80, 80)
    with caplog.at_level(logging.WARNING):
        slide = open_for_segmentation(image, target_mpp=0.5)
    assert slide.size == (80, 80) and "no µm/px metadata" in caplog.text
    result = segment_slide(image, tmp_path / "o.zarr", varied_unet(), tile_size=64, target_mpp=0.5)
    assert result.shape == (80, 80)


def test_segment_slide_at_target_mpp_records_it(tmp_path):
    result = segment_slide(open_slide(random_image(120, 100), mpp=0.25), tmp_path / "o.zarr", varied_unet(),
                           tile_size=32, target_mpp=0.5)  # fmt: skip
    assert result.shape == (60, 50) and result.mpp == pytest.approx(0.5)


@pytest.mark.parametrize("mpp, factor", [(0.2527, 2.0), (0.25, 2.0), (0.126, 4.0), (0.3, 0.5 / 0.3)])
def test_a_scan_near_half_the_target_is_resampled_by_exactly_two(mpp, factor):
    slide = open_at_mpp(open_slide(random_image(90, 70), mpp=mpp), 0.5)
    assert isinstance(slide, ResampledSource) and slide.factor == pytest.approx(factor)
    assert slide.mpp == pytest.approx(mpp * factor)  # the µm/px it really is, recorded in the store


@pytest.mark.parametrize("shape", [(64, 90), (67, 91)])
def test_resampling_by_two_is_the_rounded_mean_of_each_two_by_two_block_in_any_region(shape):
    image = random_image(*shape, seed=4)
    view = ResampledSource(open_slide(image), 2.0)
    h, w = shape[0] // 2, shape[1] // 2
    expected = np.rint(image[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).astype(np.float64).mean(axis=(1, 3)))
    whole = view.read(0, h, 0, w)
    assert np.array_equal(whole, expected.astype(np.uint8))
    assert np.array_equal(view.read(5, 21, 3, 40), whole[5:21, 3:40])
    general = ResampledSource(open_slide(image), 2.0 + 1e-12)  # the separable filter, a hair off 2
    assert np.array_equal(general.read(0, h, 0, w), whole)


def test_implausible_pixel_size_is_flagged_when_segmenting_a_level_and_in_the_summary(tmp_path, caplog):
    from pipeline.analysis.summary import summarize_store

    slide = shared_file("slides/boxes-generic.tiff")  # its metadata claims 352.8 µm/px
    with caplog.at_level(logging.WARNING):
        result = segment_slide(slide, tmp_path / "boxes.zarr", varied_unet(), tile_size=64, level=0)
    assert result.error is None and "outside the 0.05-5 that slide scanners write" in caplog.text
    assert summarize_store(tmp_path / "boxes.zarr").row()["mpp_plausible"] is False
    cmu = segment_slide(shared_file("slides/cmu-1-small-region.svs"), tmp_path / "cmu.zarr", varied_unet(),
                        tile_size=256, level=0, tissue_mask=True)  # fmt: skip
    assert cmu.error is None and summarize_store(tmp_path / "cmu.zarr").row()["mpp_plausible"] is True
