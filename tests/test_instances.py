"""Nuclei instances: the whole-image rule on hand-made maps, the out-of-core labelling equal to it id for id, and
the job's store carrying them as ``labels/nuclei`` when (and only when) the model has a rule."""

import numpy as np
import pytest
import zarr
from conftest import random_image, varied_unet
from scipy import ndimage

from pipeline import open_slide, segment_slide
from pipeline.analysis.components import ComponentOptions
from pipeline.analysis.instance_labels import write_instance_labels
from pipeline.analysis.instance_zarr import label_instances_zarr
from pipeline.analysis.instances import NO_LABEL, InstanceRule, grow, label_instances


def test_touching_nuclei_separated_by_boundary_pixels_get_two_ids():
    classes = np.zeros((10, 14), np.uint8)
    classes[2:8, 1:13] = 2  # one rim-connected blob ...
    classes[3:7, 2:6] = classes[3:7, 8:12] = 1  # ... with two interiors, boundary pixels between them
    ids = label_instances(classes, InstanceRule(grow_steps=3))
    assert set(np.unique(ids)) == {0, 1, 2}
    assert (ids[3:7, 2:6] == 1).all() and (ids[3:7, 8:12] == 2).all()
    assert np.array_equal(ids > 0, classes > 0)  # the rim is shared out, nothing else is taken


def test_ids_follow_scipy_label_order():
    rng = np.random.default_rng(0)
    classes = (rng.random((60, 80)) < 0.45).astype(np.uint8)
    for connectivity in (4, 8):
        rule = InstanceRule(grow_steps=0, min_seed_area=1, connectivity=connectivity)
        expected, _ = ndimage.label(classes == 1, structure=rule.structure)
        assert np.array_equal(label_instances(classes, rule), expected)


def test_small_seeds_are_dropped_and_the_rest_keep_their_order():
    classes = np.zeros((8, 12), np.uint8)
    classes[1:3, 1:3] = 1  # 4 px: kept, id 1
    classes[1, 6] = 1  # 1 px: dropped
    classes[5:7, 8:11] = 1  # 6 px: kept, id 2 (would be 3 with the small one)
    ids = label_instances(classes, InstanceRule(grow_steps=0, min_seed_area=4))
    assert ids[1, 6] == 0 and set(np.unique(ids)) == {0, 1, 2} and (ids[5:7, 8:11] == 2).all()


def test_a_pixel_reached_by_two_seeds_in_one_step_takes_the_smaller_id():
    classes = np.full((1, 5), 2, np.uint8)
    classes[0, 0] = classes[0, 4] = 1
    ids = label_instances(classes, InstanceRule(grow_steps=2, min_seed_area=1))
    assert ids.tolist() == [[1, 1, 1, 2, 2]]  # the middle pixel is reached by both at step 2


def test_growth_stops_after_grow_steps_and_at_background():
    classes = np.full((1, 9), 2, np.uint8)
    classes[0, 0], classes[0, 6] = 1, 0  # a seed, a rim, a background gap, more rim beyond it
    assert label_instances(classes, InstanceRule(grow_steps=3, min_seed_area=1)).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0, 0]]
    assert label_instances(classes, InstanceRule(grow_steps=9, min_seed_area=1)).tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0]]


def test_growth_is_diagonal_and_the_image_border_is_not_padded():
    seeds = np.zeros((3, 3), np.uint32)
    seeds[0, 0] = 7
    assert grow(seeds, np.ones((3, 3), bool), 1).tolist() == [[7, 7, 0], [7, 7, 0], [0, 0, 0]]


@pytest.mark.parametrize("shape", [(40, 53), (1, 17), (17, 1)])
def test_growth_equals_repeated_3x3_minimum_filters(shape):
    """The sparse growth against the plain definition: each step, every open mask pixel takes the 3 x 3 minimum
    of the ids around it (0 counting as +inf, nothing beyond the border), all pixels at once."""
    rng = np.random.default_rng(sum(shape))
    for _ in range(4):
        seeds = np.where(rng.random(shape) < 0.08, rng.integers(1, 40, shape), 0).astype(np.uint32)
        mask = rng.random(shape) < 0.6
        expected = seeds.copy()
        for _ in range(3):
            infinite = np.where(expected == 0, np.uint32(NO_LABEL), expected)
            smallest = ndimage.minimum_filter(infinite, size=3, mode="constant", cval=NO_LABEL)
            expected = np.where(mask & (expected == 0) & (smallest != NO_LABEL), smallest, expected)
        assert np.array_equal(grow(seeds, mask, 3), expected)
        assert np.array_equal(grow(seeds, mask, 0), seeds)


def test_the_rule_round_trips_and_refuses_unknown_keys():
    rule = InstanceRule(grow_classes=(2, 3), connectivity=8, name="cells")
    assert InstanceRule.from_dict(rule.to_dict()) == rule and rule.to_dict()["grow_classes"] == [2, 3]
    with pytest.raises(ValueError, match="unknown keys"):
        InstanceRule.from_dict({"seed_class": 1, "grow_step": 2})
    assert InstanceRule.from_card(varied_unet().card) is None


def blob_classes(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth random blobs: nucleus interiors inside boundary rims, of every size, crossing chunk borders and corners."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random((height, width)), 2.5)
    classes = np.zeros((height, width), np.uint8)
    classes[noise > np.quantile(noise, 0.55)] = 2
    classes[noise > np.quantile(noise, 0.68)] = 1
    return classes


@pytest.fixture(scope="module")
def class_maps(tmp_path_factory):
    folder = tmp_path_factory.mktemp("instances")
    maps = {}
    # the second: edges that are no multiple of a chunk; the third: last blocks (3 and 2 px) thinner than the halo
    for shape, seed in (((1000, 1300), 0), ((997, 1301), 1), ((1027, 1282), 2)):
        classes = blob_classes(*shape, seed)
        maps[shape] = (classes, zarr.create_array(str(folder / f"map{seed}"), data=classes, chunks=(64, 64)))
    return folder, maps


@pytest.mark.parametrize("connectivity, grow_steps, shape", [
    (4, 0, (1000, 1300)), (4, 3, (1000, 1300)), (8, 1, (1000, 1300)), (8, 5, (997, 1301)), (4, 2, (997, 1301)),
    (8, 5, (1027, 1282)), (4, 2, (1027, 1282)),
])  # fmt: skip
def test_out_of_core_ids_equal_the_whole_image_ids_exactly(class_maps, connectivity, grow_steps, shape):
    folder, maps = class_maps
    classes, array = maps[shape]
    rule = InstanceRule(connectivity=connectivity, grow_steps=grow_steps)
    out = zarr.create_array(str(folder / f"out{connectivity}-{grow_steps}"), shape=shape, chunks=(64, 64),
                            shards=(128, 128), dtype="uint32", overwrite=True)  # fmt: skip
    count = label_instances_zarr(array, out, rule, folder / "scratch", ComponentOptions(block=128, workers=2))
    expected = label_instances(classes, rule)
    assert count == expected.max() > 300
    assert np.array_equal(out[...], expected)  # the very ids, not up to a relabelling
    assert not (folder / "scratch").exists()


@pytest.fixture(scope="module")
def rule_store(tmp_path_factory):
    model = varied_unet(num_classes=3)
    model.card.metadata["instances"] = {"grow_steps": 2, "min_seed_area": 2, "connectivity": 8}
    path = tmp_path_factory.mktemp("rule") / "slide.zarr"
    result = segment_slide(open_slide(random_image(260, 330, seed=3), mpp=0.5), path, model, tile_size=64,
                           shard_tiles=2)  # fmt: skip
    assert result.error is None
    return path


def test_the_job_writes_the_instances_of_its_own_mask_as_labels_nuclei(rule_store):
    root = zarr.open_group(str(rule_store), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["segmentation", "nuclei"]
    recorded = root.attrs["wsi_unet"]["instances"]
    rule = InstanceRule.from_dict(recorded["rule"])
    expected = label_instances(root["labels/segmentation/0"][...], rule)
    nuclei = root["labels/nuclei"]
    assert nuclei["0"].dtype == np.uint32 and np.array_equal(nuclei["0"][...], expected)
    assert recorded["count"] == expected.max() > 0 and root.attrs["wsi_unet"]["status"] == "complete"
    segmentation = root["labels/segmentation"]
    for level in segmentation.array_keys():  # same levels, shapes, chunks and shards; ids sampled, never averaged
        a, s = nuclei[level], segmentation[level]
        assert (a.shape, a.chunks, a.shards) == (s.shape, s.chunks, s.shards)
        step = 2 ** int(level)
        assert np.array_equal(a[...], expected[::step, ::step])
    assert nuclei.attrs["ome"]["image-label"]["source"] == {"image": "../../"}
    assert not (rule_store / ".instances-scratch").exists()


def test_rewriting_a_half_written_label_image_gives_the_same_one(rule_store, tmp_path):
    import shutil

    copy = tmp_path / "copy.zarr"
    shutil.copytree(rule_store, copy)
    zarr.open_array(str(copy / "labels/nuclei/0"), mode="r+")[:50, :50] = 99  # a crash halfway left garbage
    rule = InstanceRule.from_dict(zarr.open_group(str(rule_store), mode="r").attrs["wsi_unet"]["instances"]["rule"])
    write_instance_labels(copy, rule)
    for level in zarr.open_group(str(rule_store / "labels/nuclei"), mode="r").array_keys():
        assert np.array_equal(zarr.open_array(str(copy / "labels/nuclei" / level))[...],
                              zarr.open_array(str(rule_store / "labels/nuclei" / level))[...])  # fmt: skip
    assert zarr.open_group(str(copy / "labels"), mode="r").attrs["ome"]["labels"] == ["segmentation", "nuclei"]


def test_a_model_without_a_rule_writes_no_instances(tmp_path):
    path = tmp_path / "slide.zarr"
    assert segment_slide(random_image(130, 150, seed=4), path, varied_unet(num_classes=3), tile_size=64).error is None
    root = zarr.open_group(str(path), mode="r")
    assert root["labels"].attrs["ome"]["labels"] == ["segmentation"] and "nuclei" not in root["labels"]
    assert root.attrs["wsi_unet"]["instances"] is None
