"""Downstream reading: open_result gives physical coordinates; previews show the mask over the slide."""

import numpy as np
import pytest
from PIL import Image

from conftest import random_image, varied_unet
from pipeline import open_labels, open_slide, segment_slide
from pipeline.store.results import open_result, write_preview


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    segment_slide(open_slide(random_image(300, 260), mpp=0.5), path, varied_unet(), tile_size=64)
    return path


def test_open_result_is_lazy_with_micrometre_coordinates(store):
    result = open_result(store)
    assert result.dims == ("y", "x") and result.shape == (300, 260)
    assert result.attrs["units"] == "micrometer" and result.attrs["class_names"][0] == "background"
    assert float(result.y[0]) == pytest.approx(0.25) and float(result.x[1]) == pytest.approx(0.75)
    assert (result.data.compute() == open_labels(store)[...]).all()
    coarse = open_result(store, level=1)
    assert float(coarse.x[1] - coarse.x[0]) == pytest.approx(1.0)


def test_open_result_refuses_an_unfinished_store(store):
    import zarr

    root = zarr.open_group(str(store), mode="r+")
    root.attrs["wsi_unet"] = {**dict(root.attrs["wsi_unet"]), "status": "running"}
    with pytest.raises(ValueError, match="not complete"):
        open_result(store)


def test_preview_png_overlays_the_mask_on_the_thumbnail(store, tmp_path):
    slide = open_slide(random_image(300, 260))
    png = write_preview(store, slide, tmp_path / "p.png", max_side=128)
    picture = np.asarray(Image.open(png))
    assert max(picture.shape[:2]) <= 150 and picture.shape[2] == 3
    plain = np.asarray(Image.fromarray(slide.thumbnail(300)).resize(picture.shape[1::-1]))
    assert np.abs(picture.astype(int) - plain).mean() > 1  # the overlay changed the picture
