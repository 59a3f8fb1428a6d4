"""Tiled output equals one forward pass over the whole mirror-padded slide (the project's core promise)."""

import numpy as np
import pytest

from conftest import random_image, shared_file, varied_unet
from pipeline import open_labels, open_slide, segment_slide, tiled_logits, whole_image_logits


def assert_tiled_equals_whole(tiled: np.ndarray, whole: np.ndarray) -> None:
    """max |Δ logit| <= 1e-4, and argmax identical except at float-rounding ties between two classes."""
    assert np.abs(tiled - whole).max() <= 1e-4
    differ = tiled.argmax(0) != whole.argmax(0)
    if differ.any():
        top2 = np.sort(whole[:, differ], axis=0)[-2:]
        assert (top2[1] - top2[0] <= 1e-4).all(), "argmax differs away from a tie"
    # The check is only meaningful if the network's output really varies.
    counts = np.bincount(whole.argmax(0).ravel(), minlength=whole.shape[0])
    assert (counts > 0.05 * counts.sum()).sum() >= 2, f"near-constant output {counts}"


@pytest.mark.parametrize("tile_size", [32, 64, 128])
def test_synthetic_image_with_awkward_sides(tile_size):
    model = varied_unet(depth=3)
    image = random_image(203, 317)
    assert_tiled_equals_whole(tiled_logits(image, model, tile_size), whole_image_logits(model, image))


def test_depth4_paper_geometry_on_awkward_image():
    model = varied_unet(depth=4, base_channels=2)
    image = random_image(150, 97, seed=1)
    assert_tiled_equals_whole(tiled_logits(image, model, 64), whole_image_logits(model, image))


def test_bilinear_batchnorm_variant_is_also_exact():
    model = varied_unet(depth=2, up_mode="bilinear", batch_norm=True)
    image = random_image(120, 90, seed=2)
    assert_tiled_equals_whole(tiled_logits(image, model, 32), whole_image_logits(model, image))


def test_real_slide_cmu_small_region():
    path = shared_file("slides/cmu-1-small-region.svs")
    model = varied_unet(depth=3)
    image = open_slide(path).read(0, 2967, 0, 2220)
    assert_tiled_equals_whole(tiled_logits(path, model, 256), whole_image_logits(model, image))


def test_slide_smaller_than_a_tile_and_than_the_halo():
    path = shared_file("slides/small-16px.svs")
    model = varied_unet(depth=3)  # halo 44 > 16
    image = open_slide(path).read(0, 16, 0, 16)
    tiled = tiled_logits(path, model, 64)
    whole = whole_image_logits(model, image)
    assert tiled.shape == (3, 16, 16)
    assert np.abs(tiled - whole).max() <= 1e-4 and (tiled.argmax(0) == whole.argmax(0)).all()


def test_level_above_zero_of_a_generic_tiff():
    path = shared_file("slides/boxes-generic.tiff")
    model = varied_unet(depth=2)
    slide = open_slide(path, level=1)
    image = slide.read(0, slide.size[0], 0, slide.size[1])
    assert_tiled_equals_whole(tiled_logits(path, model, 32, level=1), whole_image_logits(model, image))


def test_segment_slide_store_matches_whole_image_argmax(tmp_path):
    model = varied_unet(depth=3)
    image = random_image(203, 317, seed=3)
    result = segment_slide(image, tmp_path / "out.zarr", model, tile_size=64, batch_size=3)
    whole = whole_image_logits(model, image)
    labels = open_labels(tmp_path / "out.zarr")[...]
    differ = labels != whole.argmax(0)
    top2 = np.sort(whole[:, differ], axis=0)[-2:]
    assert (top2[1] - top2[0] <= 1e-4).all()
    assert result.tiles_run == result.tiles_total == 4 * 5
