"""The synthetic demo slide: an OpenSlide-readable pyramid that looks like H&E, with a consistent mask."""

from __future__ import annotations

import hashlib

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from pipeline.demo import synthetic
from pipeline.demo.synthetic import make_demo_slide

H, W, MPP, TILE = 1536, 1280, 0.5, 256


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_slide(tmp_path_factory.mktemp("demo") / "demo.tiff", height=H, width=W, mpp=MPP, seed=0)


@pytest.fixture(scope="module")
def levels(demo):
    with openslide.OpenSlide(str(demo.slide_path)) as slide:
        dims = slide.level_dimensions
        return [np.asarray(slide.read_region((0, 0), i, d).convert("RGB")) for i, d in enumerate(dims)]


@pytest.fixture(scope="module")
def mask(demo):
    return tifffile.imread(demo.mask_path)


def test_opens_as_generic_tiff_pyramid(demo):
    with openslide.OpenSlide(str(demo.slide_path)) as slide:
        assert slide.properties["openslide.vendor"] == "generic-tiff"
        assert slide.level_count >= 2
        assert slide.level_dimensions[0] == (W, H)
        for (w0, h0), (w1, h1) in zip(slide.level_dimensions, slide.level_dimensions[1:]):
            assert (w1, h1) == ((w0 + 1) // 2, (h0 + 1) // 2)
        assert max(slide.level_dimensions[-1]) <= 1024
        assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
        assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
    assert demo.shape == (H, W) and demo.mpp == MPP and demo.level_shapes[0] == (H, W)
    with tifffile.TiffFile(demo.slide_path) as tf:
        assert tf.is_bigtiff and not tf.is_ome and len(tf.pages) == len(demo.level_shapes)
        assert all(not p.subifds for p in tf.pages)  # levels are top-level pages, not SubIFDs
        assert [p.subfiletype for p in tf.pages] == [0] + [1] * (len(tf.pages) - 1)
        assert all(p.is_tiled and p.tile == (TILE, TILE) for p in tf.pages)
        xres = [p.tags["XResolution"].value for p in tf.pages]
        assert [n / d for n, d in xres] == pytest.approx([1e4 / MPP / 2**i for i in range(len(xres))])


def test_looks_like_h_and_e(levels, mask):
    rgb = levels[0].astype(np.float32)
    corner = rgb[:32, :32].reshape(-1, 3)
    assert corner.mean() > 230 and np.ptp(corner.mean(axis=0)) < 5  # near-white grey glass
    tissue = (rgb.max(-1) - rgb.min(-1)) > 30
    assert 0.3 < tissue.mean() < 0.65
    stroma = rgb[tissue & (mask == 0)].mean(axis=0)
    nuclei = rgb[mask == 1].mean(axis=0)
    assert stroma[0] > stroma[1] and stroma[2] > stroma[1]  # pink: red and blue above green
    assert nuclei.sum() < 0.7 * stroma.sum()  # nuclei much darker than stroma
    assert nuclei[2] > nuclei[0] > nuclei[1]  # purple: blue dominant
    assert tissue[mask == 1].mean() > 0.95  # nuclei only inside tissue


def test_lower_level_is_downsampled_level0(levels):
    l0, l1 = levels[0].astype(np.float32), levels[1].astype(np.float32)
    halved = l0.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(halved - l1).mean() < 4  # JPEG twice, nothing else


def test_mask_shape_and_nuclei_fraction(demo, mask, levels):
    assert mask.shape == (H, W) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    with tifffile.TiffFile(demo.mask_path) as tf:
        page = tf.pages[0]
        assert page.is_tiled and page.compression in (8, 32946, 50000)
    tissue = synthetic.tissue_region(H, W, MPP, seed=0, downsample=1)
    assert 0.02 < mask.sum() / tissue.sum() < 0.30
    _, n = ndimage.label(mask)
    assert 0.5 * demo.nuclei_count < n <= demo.nuclei_count * 1.1  # overlaps merge some components


def test_same_seed_same_bytes_other_seed_differs(demo, tmp_path):
    again = make_demo_slide(tmp_path / "again.tiff", height=H, width=W, mpp=MPP, seed=0)
    assert _digest(again.slide_path) == _digest(demo.slide_path)
    assert _digest(again.mask_path) == _digest(demo.mask_path)
    assert again.nuclei_count == demo.nuclei_count
    other = make_demo_slide(tmp_path / "other.tiff", height=256, width=320, mpp=MPP, seed=1)
    assert other.level_shapes == ((256, 320),)
    first = make_demo_slide(tmp_path / "first.tiff", height=256, width=320, mpp=MPP, seed=0)
    assert not np.array_equal(tifffile.imread(other.mask_path), tifffile.imread(first.mask_path))


def test_rendering_does_not_depend_on_block_cuts():
    """Drawing per tile must equal drawing the whole region: nuclei and blur cross block borders intact."""
    model = synthetic._Model(H, W, MPP, seed=0)
    y0, x0, h, w = 512, 384, 256, 512
    whole_rgb, whole_mask = model.rgb(y0, x0, h, w), model.nuclei(y0, x0, h, w, texture=False)[1]
    assert whole_mask.mean() > 0.02
    cuts = [(y0, x0, h, 200), (y0, x0 + 200, 100, w - 200), (y0 + 100, x0 + 200, h - 100, w - 200)]
    rgb, msk = np.zeros_like(whole_rgb), np.zeros_like(whole_mask)
    for y, x, bh, bw in cuts:
        rgb[y - y0 : y - y0 + bh, x - x0 : x - x0 + bw] = model.rgb(y, x, bh, bw)
        msk[y - y0 : y - y0 + bh, x - x0 : x - x0 + bw] = model.nuclei(y, x, bh, bw, texture=False)[1]
    np.testing.assert_array_equal(msk, whole_mask)
    np.testing.assert_array_equal(rgb, whole_rgb)


def test_nuclei_cross_tile_borders_in_written_mask(mask):
    """A nucleus cut at a tile border would leave the border columns/rows unpaired; they must look interior."""

    def continuity(m: np.ndarray, xs: range) -> float:  # P(next column is nucleus | this column is), pooled
        return float(sum((m[:, x - 1] & m[:, x]).sum() for x in xs) / max(sum(m[:, x - 1].sum() for x in xs), 1))

    for m in (mask.astype(bool), mask.T.astype(bool)):
        borders = continuity(m, range(TILE, m.shape[1], TILE))
        interior = continuity(m, range(TILE // 2, m.shape[1], TILE))
        assert borders > 0.6 and borders > 0.85 * interior


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="multiple of 16"):
        make_demo_slide(tmp_path / "x.tiff", 64, 64, tile=100)
    with pytest.raises(ValueError, match="positive"):
        make_demo_slide(tmp_path / "x.tiff", 0, 64)
    assert not list(tmp_path.iterdir())
