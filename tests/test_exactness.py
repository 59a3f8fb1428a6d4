"""Tiled output equals one forward pass over the whole mirror-padded slide (the project's core promise)."""

import numpy as np
import pytest

import tifffile
import zarr
from PIL import Image

from conftest import NON_INTEGER_LEVELS, random_image, shared_file, varied_unet
from pipeline import open_labels, open_pyramid, open_slide, segment_slide, tiled_logits, whole_image_logits
from pipeline.slides.resolution import open_at_mpp
from pipeline.slides.sources import ResampledSource
from pipeline.store.shard_state import TILE_DONE, read_tile_states
from test_pyramid import SHARED_SLIDES, whole_level_by_openslide


def assert_tiled_equals_whole(tiled: np.ndarray, whole: np.ndarray, varied: bool = True) -> None:
    """max |Δ logit| <= 1e-4, and argmax identical except at float-rounding ties between two classes."""
    assert tiled.shape == whole.shape and np.abs(tiled - whole).max() <= 1e-4
    assert_labels_are_the_argmax(tiled.argmax(0), whole)
    if varied:  # the check is only meaningful if the network's output really varies
        counts = np.bincount(whole.argmax(0).ravel(), minlength=whole.shape[0])
        assert (counts > 0.05 * counts.sum()).sum() >= 2, f"near-constant output {counts}"


def assert_labels_are_the_argmax(labels: np.ndarray, whole: np.ndarray) -> None:
    """Labels equal the whole-image argmax except at float-rounding ties between two classes."""
    differ = labels != whole.argmax(0)
    if differ.any():
        top2 = np.sort(whole[:, differ], axis=0)[-2:]
        assert (top2[1] - top2[0] <= 1e-4).all(), "argmax differs away from a tie"


@pytest.mark.parametrize("tile_size", [32, 64, 128])
@pytest.mark.parametrize("forward_tiles", [1, 2, 3])
def test_synthetic_image_with_awkward_sides(tile_size, forward_tiles):
    """Tiles alone, or in forward windows of 2 x 2 and 3 x 3 tiles, cropped at the image's awkward edges."""
    model = varied_unet(depth=3)
    image = random_image(203, 317)
    tiled = tiled_logits(image, model, tile_size, forward_tiles=forward_tiles)
    assert_tiled_equals_whole(tiled, whole_image_logits(model, image))


def test_depth4_paper_geometry_on_awkward_image():
    model = varied_unet(depth=4, base_channels=2)
    image = random_image(150, 97, seed=1)
    assert_tiled_equals_whole(tiled_logits(image, model, 64), whole_image_logits(model, image))


def test_bilinear_batchnorm_variant_is_also_exact():
    model = varied_unet(depth=2, up_mode="bilinear", batch_norm=True)
    image = random_image(120, 90, seed=2)
    assert_tiled_equals_whole(tiled_logits(image, model, 32), whole_image_logits(model, image))


@pytest.mark.parametrize("name", SHARED_SLIDES)
def test_every_level_of_every_shared_slide(name):
    """Levels 2 and 3 of boxes-generic.tiff have downsamples 4.016 and 8.086: each must still be exact."""
    path = shared_file(f"slides/{name}")
    model = varied_unet(depth=3)
    for level in range(open_pyramid(path).level_count):
        whole = whole_level_by_openslide(path, level)
        tile = 256 if max(whole.shape) > 512 else 32
        tiled = tiled_logits(path, model, tile, level=level)
        assert tiled.shape[1:] == whole.shape[:2]
        assert_tiled_equals_whole(tiled, whole_image_logits(model, whole), varied=max(whole.shape) > 64)


@pytest.mark.parametrize("level", range(len(NON_INTEGER_LEVELS)))
def test_every_level_of_a_pyramid_with_non_integer_downsamples(non_integer_slide, level):
    """The built slide's level 1 is 2221 px wide under 4443 (downsample 2.0019): the whole level read by
    OpenSlide from its origin and by tifffile is the reference, and the tiled result equals it."""
    whole = whole_level_by_openslide(non_integer_slide, level)
    assert (whole == tifffile.imread(non_integer_slide, level=level)).all()
    model = varied_unet(depth=3, calibrate=whole)
    assert_tiled_equals_whole(tiled_logits(non_integer_slide, model, 128, level=level), whole_image_logits(model, whole))


def test_segment_slide_at_a_non_integer_level_stores_the_whole_level_answer(non_integer_slide, tmp_path):
    image = whole_level_by_openslide(non_integer_slide, 2)
    model = varied_unet(depth=3, seed=1, calibrate=image)
    result = segment_slide(non_integer_slide, tmp_path / "l2.zarr", model, tile_size=64, level=2, batch_size=3)
    whole = whole_image_logits(model, image)
    assert result.tiles_run == result.tiles_total == 3 * 18
    assert_labels_are_the_argmax(open_labels(tmp_path / "l2.zarr")[...], whole)


def test_a_resampled_run_is_exact_against_the_whole_resampled_image(non_integer_slide):
    """--mpp 0.75 picks level 1 (0.5005 µm/px) and resamples it by 1.4986, reading it through the exact reader."""
    view = open_at_mpp(non_integer_slide, 0.75)
    assert isinstance(view, ResampledSource) and view.base.level == 1
    whole = view.read(0, view.size[0], 0, view.size[1])
    model = varied_unet(depth=3, seed=2, calibrate=whole)
    assert_tiled_equals_whole(tiled_logits(view, model, 64), whole_image_logits(model, whole))


@pytest.mark.parametrize("level", [1, 2])
def test_openslide_only_levels_are_exact_natively_or_resampled(dicom_slide, level):
    """DICOM level 1 (downsample 2) through OpenSlide, level 2 (4.14) resampled from it: both tile exactly."""
    view = open_slide(dicom_slide, level)
    model = varied_unet(depth=2)
    whole = view.read(0, view.size[0], 0, view.size[1])
    if level == 1:
        assert (whole == whole_level_by_openslide(dicom_slide, 1)).all()
    assert_tiled_equals_whole(tiled_logits(dicom_slide, model, 16, level=level), whole_image_logits(model, whole), varied=False)


def test_forward_windows_of_several_tiles_store_what_tiles_alone_store(tmp_path):
    """Blocks of 2 x 2 tiles in one forward pass, beside single tiles where a mask leaves a block short of
    three: the same labels and probabilities as every tile alone, and tiles nobody asked for stay background."""
    model = varied_unet(depth=3)
    image = random_image(300, 420, seed=5)
    mask = np.full((300 // 30, 420 // 30), 255, np.uint8)
    mask[:5, :4] = 0  # no tissue top left: blocks there hold 0 to 2 tiles to run
    mask[7:9, 10:12] = 0  # after the mask's tile dilation: tile (7, 10) alone, in a block with three to run
    Image.fromarray(mask).save(tmp_path / "mask.png")
    stores = {}
    for k in (1, 2):
        stores[k] = tmp_path / f"k{k}.zarr"
        segment_slide(image, stores[k], model, tile_size=32, shard_tiles=4, batch_size=4, probabilities=True,
                      tissue_mask=tmp_path / "mask.png", forward_tiles=k)  # fmt: skip
    assert np.array_equal(open_labels(stores[1])[...], open_labels(stores[2])[...])
    states = read_tile_states(stores[2])
    assert states[7, 10] != TILE_DONE and (states[6:8, 10:12] == TILE_DONE).sum() == 3  # computed, not stored
    assert open_labels(stores[2])[7 * 32 : 8 * 32, 10 * 32 : 11 * 32].max() == 0 and open_labels(stores[2])[...].any()
    probabilities = [zarr.open_group(str(stores[k]), mode="r")["probabilities/0"][...].astype(int) for k in (1, 2)]
    assert np.abs(probabilities[0] - probabilities[1]).max() <= 1  # uint8 rounding of float32 softmax
    whole = whole_image_logits(model, image)
    labels = open_labels(stores[2])[...]
    run = np.kron(states == TILE_DONE, np.ones((32, 32), bool))[:300, :420]
    assert_labels_are_the_argmax(np.where(run, labels, whole.argmax(0)), whole)


def test_segment_slide_store_matches_whole_image_argmax(tmp_path):
    model = varied_unet(depth=3)
    image = random_image(203, 317, seed=3)
    result = segment_slide(image, tmp_path / "out.zarr", model, tile_size=64, batch_size=3)
    whole = whole_image_logits(model, image)
    assert_labels_are_the_argmax(open_labels(tmp_path / "out.zarr")[...], whole)
    assert result.tiles_run == result.tiles_total == 4 * 5
