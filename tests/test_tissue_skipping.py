"""Tissue masking in the engine: background tiles are never run, stay background, and are recorded."""

import numpy as np
import pytest
import zarr
from PIL import Image

from conftest import varied_unet
from pipeline import open_labels, segment_slide
from pipeline.store.shard_state import TILE_DONE, TILE_SKIPPED, read_tile_states
from pipeline.demo.synthetic import make_demo_slide


@pytest.fixture(scope="module")
def demo_slide(tmp_path_factory):
    return make_demo_slide(tmp_path_factory.mktemp("slide") / "demo.tiff", height=1024, width=1536, seed=3)


def test_tiles_without_tissue_are_skipped_and_stay_background(demo_slide, tmp_path):
    model = varied_unet()
    full = segment_slide(demo_slide.slide_path, tmp_path / "full.zarr", model, tile_size=128)
    masked = segment_slide(demo_slide.slide_path, tmp_path / "masked.zarr", model, tile_size=128, tissue_mask=True)
    assert full.tiles_run == full.tiles_total == 8 * 12
    assert 0 < masked.tiles_run < masked.tiles_total and masked.tiles_skipped == masked.tiles_total - masked.tiles_run
    root = zarr.open_group(str(tmp_path / "masked.zarr"), mode="r")
    states = read_tile_states(tmp_path / "masked.zarr")
    assert (states == TILE_DONE).sum() == masked.tiles_run and (states == TILE_SKIPPED).sum() == masked.tiles_skipped
    assert root["tissue/mask"].shape[0] > 0 and root["tissue/mask"][...].any()
    labels, reference = open_labels(tmp_path / "masked.zarr")[...], open_labels(tmp_path / "full.zarr")[...]
    for row, col in zip(*np.nonzero(states == TILE_SKIPPED)):
        assert not labels[row * 128 : (row + 1) * 128, col * 128 : (col + 1) * 128].any()
    for row, col in zip(*np.nonzero(states == TILE_DONE)):  # run tiles are exactly the unmasked result
        window = np.s_[row * 128 : (row + 1) * 128, col * 128 : (col + 1) * 128]
        assert (labels[window] == reference[window]).all()


def test_a_user_mask_image_replaces_detection(demo_slide, tmp_path):
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[:, :48] = 255  # tissue only in the left half
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = segment_slide(demo_slide.slide_path, tmp_path / "o.zarr", varied_unet(), tile_size=128,
                           tissue_mask=tmp_path / "mask.png")  # fmt: skip
    states = read_tile_states(tmp_path / "o.zarr")
    assert result.tiles_run == (states == TILE_DONE).sum() == 8 * 6 + 8  # left half, plus the dilated border column
    assert (states[:, 7:] == TILE_SKIPPED).all()
