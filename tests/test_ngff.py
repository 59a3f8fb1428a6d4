"""The store is an NGFF 0.5 image of the slide with its labels: readers find both, the models validate it, and the
slide under the mask lines up in µm at every level."""

import numpy as np
import pytest
import zarr

from conftest import random_image, varied_unet
from pipeline import open_slide, segment_slide


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    image = random_image(700, 900, seed=6) // 4  # dark, with one bright square whose centre we know
    image[200:300, 500:640] = 250
    path = tmp_path_factory.mktemp("ngff") / "slide.zarr"
    result = segment_slide(open_slide(image, mpp=0.25), path, varied_unet(), tile_size=64)
    assert result.error is None
    return path


def test_the_store_validates_as_an_ngff_image_with_labels(store):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    root = zarr.open_group(str(store), mode="r")
    image = Image.from_zarr(root)  # also checks the labels' levels against the image's
    assert len(image.attributes.ome.multiscales[0].datasets) == len(root["labels/segmentation"].attrs["ome"]["multiscales"][0]["datasets"])
    Labels.from_zarr(root["labels"])
    ImageLabel.from_zarr(root["labels/segmentation"])


def test_ome_zarr_reader_finds_the_slide_and_its_labels_at_the_root(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(store)))())
    assert any(isinstance(spec, Multiscales) for spec in nodes[0].specs) and nodes[0].data[0].shape[0] == 3
    assert any(isinstance(spec, Label) for node in nodes for spec in node.specs)


def test_viewers_draw_the_slide_in_its_own_colours(store):
    """Without ``omero`` rendering, napari-ome-zarr and vizarr show the three channels in cyan, magenta and yellow:
    a false-colour slide. ome-zarr-py's reader hands napari what the store says."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    slide = list(Reader(parse_url(str(store)))())[0].metadata
    assert slide["colormap"] == [[[0, 0, 0], [1.0, 0.0, 0.0]], [[0, 0, 0], [0.0, 1.0, 0.0]], [[0, 0, 0], [0.0, 0.0, 1.0]]]
    assert slide["contrast_limits"] == [[0, 255]] * 3 and slide["visible"] == [True] * 3
    assert slide["channel_names"] == ["red", "green", "blue"]


def test_slide_and_mask_line_up_in_micrometres_at_every_level(store):
    root = zarr.open_group(str(store), mode="r")
    mpp = root.attrs["wsi_unet"]["mpp"]
    centre_um = np.array([249.5, 569.5]) * mpp  # the square's centre in the segmented level, µm
    for dataset in root.attrs["ome"]["multiscales"][0]["datasets"]:
        level = root[dataset["path"]][...].mean(axis=0)
        scale, translation = (t[k][1:] for t, k in zip(dataset["coordinateTransformations"], ("scale", "translation")))
        bright = np.argwhere(level > 0.5 * (level.max() + level.min()))
        if len(bright) < 4:
            continue  # the square is a pixel or less here
        found_um = bright.mean(axis=0) * np.array(scale) + np.array(translation)
        assert np.abs(found_um - centre_um).max() <= 0.5 * max(scale), (dataset["path"], found_um, centre_um)


@pytest.fixture(scope="module")
def nuclei_store(tmp_path_factory):
    """A store of a model that carries an instance rule: it has labels/nuclei beside labels/segmentation."""
    model = varied_unet()
    model.card.metadata["instances"] = {"grow_steps": 2, "min_seed_area": 2}
    path = tmp_path_factory.mktemp("ngff-nuclei") / "slide.zarr"
    assert segment_slide(open_slide(random_image(300, 260, seed=7), mpp=0.5), path, model, tile_size=64).error is None
    return path


def test_the_instance_labels_validate_and_readers_find_them(nuclei_store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    root = zarr.open_group(str(nuclei_store), mode="r")
    Image.from_zarr(root)  # the labels' levels against the image's, nuclei included
    assert Labels.from_zarr(root["labels"]).attributes.ome.labels == ["segmentation", "nuclei"]
    ImageLabel.from_zarr(root["labels/nuclei"])
    nodes = list(Reader(parse_url(str(nuclei_store)))())
    found = {node.zarr.path.rstrip("/").rsplit("/", 1)[-1]: node for node in nodes
             if any(isinstance(spec, Label) for spec in node.specs)}  # fmt: skip
    assert set(found) == {"segmentation", "nuclei"}
    assert found["nuclei"].data[0].dtype == np.uint32 and found["nuclei"].data[0].shape == root["labels/nuclei/0"].shape


@pytest.mark.parametrize("which", ["store", "nuclei_store"])
def test_every_image_and_label_meets_the_strict_ngff_05_requirements(which, request):
    """NGFF 0.5's strict schemas (strict_image, strict_label) add to the plain ones: every multiscales entry names
    its ``name``, ``type`` and ``metadata``, and every label image lists ``colors``."""
    root = zarr.open_group(str(request.getfixturevalue(which)), mode="r")
    groups = [root] + [root[f"labels/{name}"] for name in root["labels"].attrs["ome"]["labels"]]
    assert len(groups) == (2 if which == "store" else 3)
    for group in groups:
        for multiscale in group.attrs["ome"]["multiscales"]:
            assert {"name", "type", "metadata"} <= set(multiscale), (group.path, sorted(multiscale))
    for group in groups[1:]:
        colors = group.attrs["ome"]["image-label"]["colors"]
        assert colors and all({"label-value", "rgba"} <= set(c) for c in colors), group.path


@pytest.fixture(scope="module")
def full_store(tmp_path_factory):
    """``slide_image="full"``: the root image is the segmented level itself (5 x 3 shards of 64 px here)."""
    from pipeline.store import slide_overview

    image = random_image(300, 190, seed=8)
    path = tmp_path_factory.mktemp("ngff-full") / "slide.zarr"
    saved = slide_overview.FULL_SHARD, slide_overview.CHUNK
    slide_overview.FULL_SHARD, slide_overview.CHUNK = 64, 32  # several shards on a small image
    try:
        result = segment_slide(open_slide(image, mpp=0.5), path, varied_unet(), tile_size=64, slide_image="full")
    finally:
        slide_overview.FULL_SHARD, slide_overview.CHUNK = saved
    assert result.error is None
    return path, image


def test_the_full_resolution_slide_image_is_the_slide_pixel_for_pixel_and_validates(full_store):
    from ome_zarr_models.v05.image import Image

    from pipeline.slides.sources import mean_2x2
    from pipeline.store.slide_overview import halve

    path, image = full_store
    root = zarr.open_group(str(path), mode="r")
    Image.from_zarr(root)
    assert root.attrs["wsi_unet"]["slide_image"] == "full"
    level0 = root["0"][...].transpose(1, 2, 0)
    assert np.array_equal(level0, image)
    assert np.array_equal(root["1"][...].transpose(1, 2, 0), halve(image))
    assert np.array_equal(halve(image)[:-1], mean_2x2(image[:298, :190]))  # whole 2 x 2 means inside
    for dataset in root.attrs["ome"]["multiscales"][0]["datasets"]:  # level k's shape is the mask's level k's
        assert root[dataset["path"]].shape[1:] == root[f"labels/segmentation/{dataset['path']}"].shape


def test_the_full_resolution_image_lines_up_with_the_mask(full_store):
    path, _ = full_store
    root = zarr.open_group(str(path), mode="r")
    for dataset in root.attrs["ome"]["multiscales"][0]["datasets"]:
        scale, translation = (t[k] for t, k in zip(dataset["coordinateTransformations"], ("scale", "translation")))
        k = int(dataset["path"])
        assert scale[1:] == [0.5 * 2**k] * 2 and translation[1:] == [0.5 * (2**k - 1) / 2] * 2
