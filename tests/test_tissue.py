"""Tissue detection: finds stained tissue (pale too), never noise on glass; tile selection is conservative."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from pipeline.demo import synthetic
from pipeline.slides.tissue import load_mask_image, tiles_with_tissue, tissue_mask

H, W, DS = 1536, 1280, 16


@pytest.fixture(scope="module")
def thumbnail(tmp_path_factory):
    demo = synthetic.make_demo_slide(tmp_path_factory.mktemp("tissue") / "demo.tiff", height=H, width=W, seed=0)
    with openslide.OpenSlide(str(demo.slide_path)) as slide:
        level = slide.level_count - 1
        full = slide.read_region((0, 0), level, slide.level_dimensions[level]).convert("RGB")
        factor = DS // round(slide.level_downsamples[level])
        return np.asarray(full.resize((W // DS, H // DS), Image.BOX if factor > 1 else Image.NEAREST))


def _glass(shape, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(242 + rng.normal(0, 2, (*shape, 3)), 0, 255).astype(np.uint8)


def test_finds_tissue_of_the_demo_slide(thumbnail):
    truth = synthetic.tissue_region(H, W, seed=0, downsample=DS)
    found = tissue_mask(thumbnail)
    assert found.shape == truth.shape
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.85
    assert (found & ~truth).sum() < 0.1 * truth.sum()  # lumens filled, little else
    assert not found[:4, :4].any() and not found[-4:, -4:].any()  # glass corners


def test_blank_and_constant_images_have_no_tissue():
    assert not tissue_mask(_glass((64, 80))).any()
    assert not tissue_mask(np.full((32, 32, 3), 255, np.uint8)).any()
    assert not tissue_mask(np.zeros((32, 32, 4), np.uint8)).any()  # transparent OpenSlide padding
    assert not tissue_mask(np.full((16, 16, 3), 1.0)).any()  # float 0-1 white


def test_pale_tissue_next_to_dark_tissue_is_kept():
    img = _glass((120, 160))
    img[20:60, 20:70] = (150, 60, 140)  # strongly stained: pulls Otsu up
    img[70:110, 90:150] = (236, 210, 228)  # faint eosin, saturation ~0.11
    mask = tissue_mask(img)
    assert mask[30:50, 30:60].all() and mask[75:105, 95:145].all()
    assert not mask[:15].any() and not mask[:, :15].any()
    assert tissue_mask(np.where(np.arange(120)[:, None, None] < 60, img, 242).astype(np.uint8))[30:50, 30:60].all()


def test_pale_only_slide_and_small_specks():
    img = _glass((100, 100), seed=1)
    img[30:70, 30:70] = (232, 205, 224)
    img[5, 90] = (120, 40, 120)  # a dust speck
    mask = tissue_mask(img)
    assert mask[35:65, 35:65].all() and not mask[5, 90] and mask.sum() < 1.2 * 40 * 40


def test_tissue_mask_rejects_non_rgb():
    with pytest.raises(ValueError, match="RGB thumbnail"):
        tissue_mask(np.zeros((8, 8)))


def test_tiles_with_tissue_selects_expected_tiles():
    mask = np.zeros((8, 8), bool)  # 1 mask px = 32 level px; dilation makes mask px 1-3 x 1-3 count
    mask[2, 2] = True  # level px [64, 96) x [64, 96)
    boxes = [
        (64, 64, 96, 96),  # exactly the tissue pixel
        (90, 90, 100, 100),  # tiny box straddling mask px 2 and 3, rounded outwards
        (0, 0, 64, 64),  # mask px 0-1: touches (1, 1), a neighbour of the tissue: kept (conservative)
        (0, 0, 32, 32),  # mask px (0, 0): two px away: skipped
        (96, 96, 128, 128),  # diagonal neighbour (3, 3): kept
        (120, 120, 128, 128),  # tiny box inside (3, 3): kept
        (128, 0, 192, 64),  # mask rows 4-5: skipped
        (0, 128, 256, 256),  # mask columns 4-7: skipped
        (160, 160, 300, 300),  # partly outside the mask, no tissue: skipped
        (300, 300, 400, 400),  # wholly outside the mask: skipped
    ]
    keep = tiles_with_tissue(mask, 1 / 32, boxes)
    assert keep.tolist() == [True, True, True, False, True, True, False, False, False, False]
    assert tiles_with_tissue(np.zeros((8, 8), bool), 1 / 32, boxes[:3]).tolist() == [False] * 3
    assert tiles_with_tissue(mask, 1 / 32, []).shape == (0,)
    with pytest.raises(ValueError):
        tiles_with_tissue(mask, 0, boxes)


def test_load_mask_image_png_and_tiff(tmp_path):
    src = np.zeros((40, 50), np.uint8)
    src[10:20, 25:50] = 255
    Image.fromarray(src).save(tmp_path / "m.png")
    tifffile.imwrite(tmp_path / "m.tiff", (src > 0).astype(np.uint8))
    for name in ("m.png", "m.tiff"):
        out = load_mask_image(tmp_path / name, (80, 100))
        assert out.dtype == bool and out.shape == (80, 100)
        np.testing.assert_array_equal(out, np.kron(src > 0, np.ones((2, 2), bool)))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_mask_image(tmp_path / "bad.png", (10, 10))
