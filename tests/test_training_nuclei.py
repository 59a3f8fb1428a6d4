"""The nuclei recipe's training pieces: boundary targets, zoom/blur/JPEG augmentation, hard negatives from a
real slide, and a trained model that carries its instance rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import shared_file
from pipeline.analysis.instances import InstanceRule, label_instances
from pipeline.training import augment
from pipeline.training.data import NegativePatchSource, PatchDataset, PatchGeometry, SampleSpec
from pipeline.training.files import Rim, split_boundaries, to_classes
from pipeline.training.hard_negatives import load_hard_negatives
from pipeline.training.metrics import instance_scores

REPO = Path(__file__).resolve().parents[1]
NEGATIVES = REPO / "models" / "hard-negatives.json"


def read_negative_regions(path: Path, split: str) -> list:
    return [r for entry in load_hard_negatives(path, path.parent) for r in entry.regions if r.split == split]


def test_boundary_targets_part_touching_nuclei_and_keep_a_seed_for_every_nucleus():
    ids = np.zeros((12, 20), np.int32)
    ids[2:10, 2:10] = 1
    ids[2:10, 10:18] = 2  # touches object 1 along a column
    ids[5, 19] = 3  # one pixel: too small for an interior
    classes = split_boundaries(ids, 1)
    assert set(np.unique(classes)) == {0, 1, 2}
    assert (classes[:, 9] != 1).all() and (classes[:, 10] != 1).all()  # the shared edge is rim, not interior
    assert (classes[3:9, 3:9] == 1).all() and (classes[3:9, 11:17] == 1).all()
    assert classes[5, 19] == 1  # the last non-empty erosion of a small nucleus stays its seed
    assert np.array_equal(classes > 0, ids > 0)
    assert np.array_equal(to_classes(ids, "instances", 3, Rim(1)), classes)
    assert np.array_equal(to_classes(ids, "instances", 2), (ids > 0).astype(np.int64))  # width 0: as before


def test_contact_width_widens_the_parting_line_only_where_nuclei_touch():
    ids = np.zeros((12, 24), np.int32)
    ids[2:10, 2:10] = 1
    ids[2:10, 10:18] = 2  # touches object 1 along a column
    ids[4:7, 18:21] = 3  # 3 x 3, touching object 2: the band would swallow its whole interior
    classes = split_boundaries(ids, 1, contact=2)
    assert (classes[2:10, 8:12] == 2).all()  # 2 px of each side of the shared edge are boundary
    assert (classes[3:9, 3:8] == 1).all() and (classes[3:9, 12:16] == 1).all()  # elsewhere the 1 px rim only
    assert np.array_equal(classes[:, 2:8], split_boundaries(ids, 1)[:, 2:8])  # object 1's far side is unchanged
    assert (classes[ids == 3] == 1).sum() >= 1  # every nucleus keeps a seed
    assert np.array_equal(classes > 0, ids > 0)
    assert np.array_equal(to_classes(ids, "instances", 3, Rim(1, 2)), classes)
    with pytest.raises(ValueError, match="needs a boundary width"):
        Rim(0, 2)


def test_core_targets_keep_each_nucleus_centre_as_its_seed_and_part_touching_ones_by_their_size():
    yy, xx = np.mgrid[:40, :60]
    ids = np.zeros((40, 60), np.int32)
    ids[(yy - 20) ** 2 + (xx - 18) ** 2 <= 100] = 1  # radius 10
    ids[((yy - 20) ** 2 + (xx - 36) ** 2 <= 64) & (ids == 0)] = 2  # radius 8, overlapping object 1: a long contact
    ids[3, 55] = 3  # one pixel
    classes = split_boundaries(ids, 1, core=0.5)
    for k, (cy, cx) in {1: (20, 18), 2: (20, 36)}.items():
        assert classes[cy, cx] == 1 and 0.1 < (classes[ids == k] == 1).mean() < 0.5  # the centre, a share of the area
    from scipy import ndimage

    _, count = ndimage.label(classes == 1)
    assert count == 3  # one seed each: the two discs' seeds are apart, the one-pixel object keeps itself
    gap = np.abs(np.subtract.outer(*[np.argwhere((classes == 1) & (ids == k))[:, 1] for k in (1, 2)])).min()
    assert gap >= 4  # touching nuclei's seeds lie apart by part of their size, not by a 1 px line
    assert np.array_equal(classes > 0, ids > 0)
    assert np.array_equal(to_classes(ids, "instances", 3, Rim(1, 0, 0.5)), classes)
    rule = InstanceRule(seed_class=1, grow_classes=(2,), grow_steps=Rim(1, 0, 0.5).reach + 1)
    regrown = label_instances(classes.astype(np.uint8), rule)
    assert instance_scores(ids, regrown).aji > 0.9  # growing the seeds back gives the objects again
    with pytest.raises(ValueError, match="core must lie in"):
        Rim(1, 0, 1.0)


def test_instance_rule_of_a_trained_model_grows_seeds_across_the_widest_boundary():
    from dataclasses import replace

    from pipeline.training.config import TrainConfig
    from pipeline.training.loop import instance_metadata

    yy, xx = np.mgrid[:80, :90]
    ids = np.zeros((80, 90), np.int32)
    ids[(yy - 40) ** 2 + (xx - 30) ** 2 <= 25**2] = 7  # deeper than Rim.LARGEST_RADIUS
    ids[((yy - 40) ** 2 + (xx - 60) ** 2 <= 6**2) & (ids == 0)] = 3  # a small one touching it
    ids[2:9, 80:87] = 900_000  # a large id: tables are indexed by rank
    for rim in (dict(boundary_width=1), dict(boundary_width=1, contact_width=2), dict(boundary_width=1, core=0.4),
                dict(boundary_width=2, contact_width=3, core=0.6)):  # fmt: skip
        cfg = TrainConfig(data=["d"], **rim)
        rule = InstanceRule.from_dict(instance_metadata(cfg)["instances"])
        assert rule.grow_steps == cfg.rim.reach + 1
        classes = to_classes(ids, "instances", 3, cfg.rim).astype(np.uint8)
        regrown = label_instances(classes, rule)
        assert np.array_equal(regrown > 0, ids > 0), rim  # the growth covers every boundary the targets can have
        assert np.array_equal(regrown, label_instances(classes, replace(rule, grow_steps=100))), rim
        assert regrown.max() == 3
    assert instance_metadata(TrainConfig(data=["d"])) == {}
    whole = np.full((10, 10), 5)  # one object and no edge in the array: no core to cut
    assert (split_boundaries(whole, 1, core=0.5) == 1).all()


@pytest.mark.parametrize("read", [90, 160])
def test_zoom_keeps_image_and_labels_aligned(read):
    """A piecewise-constant image whose grey level encodes the label: after zooming, labels sit on their grey."""
    rng = np.random.default_rng(read)
    labels = np.kron(rng.integers(0, 5, (6, 6)), np.ones((read // 6 + 1, read // 6 + 1), np.int64))[:read, :read]
    image = (labels[..., None] * 50 / 255.0).astype(np.float32).repeat(3, axis=2)
    zoomed, zoomed_labels = augment.zoom(image, labels, 120)
    assert zoomed.shape == (120, 120, 3) and zoomed_labels.shape == (120, 120)
    from scipy import ndimage

    # away from label edges and corners, where linear interpolation mixes neighbours
    inside = ndimage.maximum_filter(zoomed_labels, 7) == ndimage.minimum_filter(zoomed_labels, 7)
    assert inside.mean() > 0.5
    assert np.allclose(zoomed[..., 0][inside], zoomed_labels[inside] * 50 / 255.0, atol=1e-3)


def test_blur_and_jpeg_degrade_patches_within_range_and_are_off_at_zero():
    rng = np.random.default_rng(0)
    pixels = rng.random((64, 64, 3)).astype(np.float32)
    assert augment.blur(pixels, rng, 0.0) is pixels and augment.jpeg(pixels, rng, None) is pixels
    blurred = augment.blur(pixels, rng, 1.5, probability=1.0)
    squeezed = augment.jpeg(pixels, rng, (40, 50), probability=1.0)
    for out in (blurred, squeezed):
        assert out.shape == pixels.shape and 0 <= out.min() and out.max() <= 1
        assert not np.allclose(out, pixels)
    assert blurred.std() < pixels.std()  # smoother
    assert augment.draw_zoom(rng, None) == 1.0
    zooms = [augment.draw_zoom(rng, (0.75, 2.0), probability=1.0) for _ in range(200)]
    assert 0.75 <= min(zooms) and max(zooms) <= 2.0


def test_hard_negative_regions_give_all_background_patches_from_inside_the_region():
    slide = shared_file("slides/cmu-1-small-region.svs")
    regions = read_negative_regions(NEGATIVES, "train")
    assert regions and all(r.split == "train" for r in regions)
    assert not {r.name for r in regions} & {r.name for r in read_negative_regions(NEGATIVES, "eval")}
    region = regions[0]
    source = NegativePatchSource(slide, region, context=100, mpp=0.5)
    y0, x0, y1, x1 = region.box  # cmu-1 is 0.499 µm/px: read as is, no resampling
    assert source.image.shape[:2] == (y1 - y0 + 200, x1 - x0 + 200) and not source.label.any()
    import openslide

    truth = np.asarray(openslide.OpenSlide(str(slide)).read_region((x0, y0), 0, (x1 - x0, y1 - y0)).convert("RGB"))
    assert np.array_equal(source.image[100:-100, 100:-100], truth)
    rng = np.random.default_rng(0)
    for _ in range(50):
        y, x = source.sample_origin(rng, 64)
        assert 100 <= y and y + 64 <= 100 + y1 - y0 and 100 <= x and x + 64 <= 100 + x1 - x0


class _Disk:
    """A tiny positive source (one nucleus) for the dataset's sampling shares."""

    negative = False

    def __init__(self):
        self.name, self.shape = "disk", (40, 40)
        self.image = np.full((40, 40, 3), 200, np.uint8)
        self.label = np.zeros((40, 40), np.uint16)
        self.label[10:20, 10:20] = 1

    area = 1600

    def tiles(self, output_size):
        return 4

    def sample_origin(self, rng, output_size):
        return 0, 0


def test_hard_negatives_get_their_share_of_the_patches():
    negative = _Disk()
    negative.negative, negative.area = True, 100
    spec = SampleSpec("instances", 3, border=False, flips=False, intensity_jitter=False, rim=Rim(1))
    dataset = PatchDataset([_Disk(), _Disk(), negative], PatchGeometry(20, 20, 0), spec, negative_fraction=0.2)
    assert np.isclose(dataset.probabilities[2], 0.2) and np.isclose(dataset.probabilities[:2].sum(), 0.8)
    assert len(dataset) == 10  # the positives' 8 tiles once, plus the negatives' share
    _, target, _ = dataset[0]
    assert set(np.unique(target.numpy())) <= {0, 1, 2}


def _nuclei_folder(folder: Path, count: int = 3, size: int = 48) -> None:
    """RGB images with touching purple disks and 16-bit instance labels."""
    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        ids = np.zeros((size, size), np.uint16)
        for k in range(1, 6):
            cy, cx = rng.integers(6, size - 6, 2)
            ids[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = k
        image = np.where(ids[..., None] > 0, [90, 40, 140], [230, 200, 220]).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"n{i}.png")
        Image.fromarray(ids).save(folder / "labels" / f"n{i}.png")


def test_a_boundary_model_records_its_instance_rule_and_the_last_epoch_is_exported(tmp_path):
    from pipeline.analysis.instances import InstanceRule
    from pipeline.training import TrainConfig, fit
    from unet import load_model

    slide = shared_file("slides/cmu-1-small-region.svs")
    _nuclei_folder(tmp_path / "data")
    regions = json.loads(NEGATIVES.read_text())
    small = {**regions, "regions": [{"name": "bg", "kind": "background", "box": [200, 1600, 300, 1700], "split": "train"}]}
    (tmp_path / "negatives.json").write_text(json.dumps(small))
    cfg = TrainConfig(data=[str(tmp_path / "data")], val_files=["n2"], label_mode="instances", boundary_width=1,
                      negatives=[[str(slide), str(tmp_path / "negatives.json")]], base_channels=4, depth=2,
                      output_size=16, samples_per_epoch=4, batch_size=2, loader_workers=0, val_tile=16, epochs=2,
                      best_metric="epoch", scale_range=(0.75, 2.0), blur=1.0, jpeg=(40, 90), mpp=0.5, validate_every=5,
                      class_names=["background", "nucleus", "nucleus boundary"])  # fmt: skip
    fit(cfg, "nuclei", tmp_path / "runs", num_workers=0)
    model = load_model(tmp_path / "runs" / "nuclei" / "best-model.pt")
    assert model.num_classes == 3 and model.card.metadata["epoch"] == 1  # the last epoch, chosen by no image
    assert InstanceRule.from_card(model.card) == InstanceRule(seed_class=1, grow_classes=(2,), grow_steps=2)
    assert model.card.metadata["negatives"] == ["negatives.json"]
    rows = [json.loads(line) for line in (tmp_path / "runs" / "nuclei" / "metrics.jsonl").read_text().splitlines()]
    assert "val_dice" not in rows[0] and "val_dice" in rows[1]  # every 5th epoch and the last


def test_the_nuclei_preset_trains_instances_on_all_twelve_images_with_hard_negatives():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import train_unet
    finally:
        sys.path.remove(str(REPO / "jobs"))
    shared_file("nuclei")
    shared_file("slides/cmu-1-small-region.svs")
    cfg = train_unet.config_from_args(train_unet.parse_args(["--preset", "nuclei"]))
    assert cfg.boundary_width == 1 and cfg.val_split == 0 and not cfg.val_files and cfg.best_metric == "epoch"
    assert cfg.class_names == ["background", "nucleus", "nucleus boundary"] and cfg.mpp == 0.5
    assert [Path(r).name for _, r in cfg.negatives] == ["hard-negatives.json"]
    assert cfg.scale_range == (0.8, 1.25) and cfg.blur > 0 and cfg.jpeg
