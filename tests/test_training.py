"""Training: the paper's weight map, augmentation alignment, metrics, and a short Ray Train run that
checkpoints, resumes and exports a model the inference engine uses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_file
from pipeline.slides.sources import read_window
from pipeline.training import augment
from pipeline.training.data import EpochSampler, PatchGeometry, SampleSpec, cut_sample
from pipeline.training.files import detect_label_mode, split_names
from pipeline.training.metrics import MetricTotals, adapted_rand_error, rand_error
from pipeline.training.weights import (
    border_weight,
    class_balance_weights,
    instances_from_classes,
    nearest_two_distances,
    weight_map,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- weight map
def two_objects(gap: int) -> np.ndarray:
    """Instance image 20 x 40: object 1 in columns 2..11, object 2 starting ``gap`` columns after it."""
    labels = np.zeros((20, 40), dtype=np.int32)
    labels[5:15, 2:12] = 1
    labels[5:15, 12 + gap : 22 + gap] = 2
    return labels


def paper_term(d1: float, d2: float, w0: float = 10.0, sigma: float = 5.0) -> float:
    return w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2))


def test_weight_map_between_two_touching_objects_matches_hand_computation():
    labels = two_objects(gap=1)  # a one-pixel background line (column 12) separates the two objects
    classes = (labels > 0).astype(np.int64)
    w_c = class_balance_weights(np.bincount(classes.ravel()))
    weights = weight_map(classes, labels, w_c, w0=10, sigma=5)
    # pixel (10, 12): one pixel from object 1 (column 11) and one from object 2 (column 13)
    assert weights[10, 12] == pytest.approx(w_c[0] + paper_term(1, 1), rel=1e-5)
    # a background pixel above the gap: (2, 12) is 3 rows above the objects' tops, diagonal distances
    d1 = math.hypot(3, 1)  # to (5, 11) and (5, 13)
    assert weights[2, 12] == pytest.approx(w_c[0] + paper_term(d1, d1), rel=1e-5)
    # object pixels carry only their class weight
    assert weights[10, 5] == pytest.approx(w_c[1])
    assert weights[10, 16] == pytest.approx(w_c[1])


def test_weight_map_for_nearby_objects_and_far_background():
    labels = two_objects(gap=3)  # background columns 12, 13, 14
    weights = weight_map(labels > 0, labels, None, w0=10, sigma=5)
    assert weights[10, 12] == pytest.approx(1 + paper_term(1, 3), rel=1e-5)
    assert weights[10, 13] == pytest.approx(1 + paper_term(2, 2), rel=1e-5)
    assert weights[10, 14] == pytest.approx(1 + paper_term(3, 1), rel=1e-5)
    # left of object 1: d1 = 2 (to column 2), d2 = 15 (to column 15): the term is tiny but exact
    assert weights[10, 0] == pytest.approx(1 + paper_term(2, 15), rel=1e-4)
    # with a single object there is no second-nearest object: no border weight anywhere
    single = (labels == 1).astype(np.int32)
    assert np.allclose(border_weight(single), 0)


def test_contact_weight_stresses_the_edges_where_two_objects_touch_and_nothing_else():
    labels = two_objects(gap=0)  # object 1 ends at column 11, object 2 starts at column 12: no background between
    classes = (labels > 0).astype(np.int64)
    plain = weight_map(classes, labels, None, w0=10, sigma=5)
    touching = weight_map(classes, labels, None, w0=10, sigma=5, contact=True)
    # the two columns that meet: d1 = 0 (the pixel's own object), d2 = 1 (the other one, next column)
    assert touching[10, 11] == pytest.approx(1 + paper_term(0, 1), rel=1e-5)
    assert touching[10, 12] == pytest.approx(1 + paper_term(0, 1), rel=1e-5)
    assert plain[10, 11] == pytest.approx(1) and plain[10, 12] == pytest.approx(1)
    # a diagonal contact counts (8-neighbours): two squares meeting at a corner
    corner = np.zeros((12, 12), dtype=np.int32)
    corner[2:6, 2:6], corner[6:10, 6:10] = 1, 2
    term = border_weight(corner, contact=True)
    assert term[5, 5] == pytest.approx(paper_term(0, math.sqrt(2)), rel=1e-5) and term[4, 4] == 0
    # every other pixel, object or background, is weighted as without it
    changed = ~np.isclose(touching, plain)
    assert set(np.unique(np.nonzero(changed)[1])) == {11, 12}
    # objects apart (a background gap) have no contact pixels: the same map either way
    apart = two_objects(gap=1)
    assert np.allclose(weight_map(apart > 0, apart, None, contact=True), weight_map(apart > 0, apart, None))


def test_nearest_two_distances_are_exact_euclidean():
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[3, 3], labels[3, 20], labels[25, 10] = 1, 2, 3
    d1, d2 = nearest_two_distances(labels)
    y, x = 10, 10
    dists = sorted([math.hypot(y - 3, x - 3), math.hypot(y - 3, x - 20), math.hypot(y - 25, x - 10)])
    assert d1[y, x] == pytest.approx(dists[0], rel=1e-5) and d2[y, x] == pytest.approx(dists[1], rel=1e-5)


def test_binary_labels_get_instances_by_connected_components():
    labels = two_objects(gap=1)
    instances = instances_from_classes(labels > 0)
    assert instances.max() == 2  # the one-pixel gap keeps them apart (4-connectivity)
    from_binary = weight_map((labels > 0).astype(np.int64), None, None)
    from_instances = weight_map((labels > 0).astype(np.int64), labels, None)
    assert np.allclose(from_binary, from_instances)


def test_class_balance_weights_are_inverse_frequency_with_unit_mean():
    w = class_balance_weights(np.array([75, 25]))
    assert w == pytest.approx([1 / (2 * 0.75), 1 / (2 * 0.25)])
    assert 0.75 * w[0] + 0.25 * w[1] == pytest.approx(1.0)


# --------------------------------------------------------------------------- augmentation
def test_zero_elastic_displacement_is_the_identity():
    rng = np.random.default_rng(1)
    image = rng.random((40, 50, 3)).astype(np.float32)
    labels = rng.integers(0, 4, (40, 50))
    field = augment.interpolate_field(np.zeros((2, 3, 3)), (40, 50))
    assert np.allclose(augment.warp(image, field, order=3), image, atol=1e-5)
    assert np.array_equal(augment.warp(labels, field, order=0), labels)


def test_elastic_field_is_smooth_and_interpolates_the_coarse_grid():
    coarse = np.random.default_rng(0).normal(0, 10, (2, 3, 3))
    field = augment.interpolate_field(coarse, (101, 101))
    assert np.allclose(field[:, ::50, ::50], coarse, atol=1e-4)  # lattice points: corners and centre
    assert np.abs(np.diff(field, axis=1)).max() < 2.0  # no jumps between neighbouring pixels


def _interior(labels: np.ndarray, radius: int = 2) -> np.ndarray:
    """Pixels whose (2 r + 1)^2 neighbourhood has a single label."""
    from scipy import ndimage

    size = 2 * radius + 1
    return ndimage.maximum_filter(labels, size) == ndimage.minimum_filter(labels, size)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_elastic_deformation_keeps_image_and_labels_aligned(seed):
    """Every pixel encodes where it comes from: the image holds ramps 2y and 2x (cubic interpolation
    reproduces a ramp exactly, so the warped image tells the exact source position) and the label is the
    pixel's id y * W + x (nearest neighbour: the rounded source position). After flips, rotations and the
    elastic warp the two must agree to within half a pixel everywhere in the patch's output window; an
    off-by-one misalignment would be off by a whole pixel."""
    size = 128
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.stack([2 * yy, 2 * xx, np.zeros_like(yy)], axis=-1).astype(np.uint8)
    ids = yy * size + xx
    geometry = PatchGeometry(input_size=56, output_size=16, halo=20)
    spec = SampleSpec("classes", size * size, border=False, elastic=True, elastic_sigma=10, intensity_jitter=False)
    inputs, target, weights = cut_sample(image, ids, 56, 56, geometry, spec, np.random.default_rng(seed))
    assert inputs.shape == (3, 56, 56) and target.shape == (16, 16) and weights.shape == (16, 16)
    source_y = inputs[0, 20:36, 20:36] * 255 / 2
    source_x = inputs[1, 20:36, 20:36] * 255 / 2
    assert np.abs(source_y - target // size).max() <= 0.5 + 1e-3
    assert np.abs(source_x - target % size).max() <= 0.5 + 1e-3
    # and the deformation really moved the content (the same draws without the elastic step differ)
    still = SampleSpec("classes", size * size, border=False, intensity_jitter=False)
    plain = cut_sample(image, ids, 56, 56, geometry, still, np.random.default_rng(seed))[1]
    assert np.abs(plain - target).max() > 0


def test_elastic_labels_stay_on_image_content_for_piecewise_constant_images():
    """A label image and an image that is 60 x label: inside regions the warped image equals 60 x the warped label."""
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 4, (13, 13)), np.ones((8, 8), dtype=np.int64))[:96, :96]
    image = (labels * 60).astype(np.uint8)[..., None]
    spec = SampleSpec("classes", 4, border=False, elastic=True, intensity_jitter=False)
    inputs, target, _ = cut_sample(image, labels, 30, 40, PatchGeometry(56, 16, 20), spec, rng)
    inside = _interior(target, 2)
    assert inside.mean() > 0.2
    assert np.abs(inputs[0, 20:36, 20:36][inside] * 255 / 60 - target[inside]).max() < 0.25


def test_patches_use_the_inference_geometry_and_mirror_padding():
    """Without augmentation a patch is exactly the inference window: input = output + 2 halo read with
    read_window (numpy "symmetric" mirroring outside the image), target = the labels under the output."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    labels = (rng.random((40, 50)) > 0.5).astype(np.uint8)
    geometry = PatchGeometry(input_size=56, output_size=16, halo=20)
    spec = SampleSpec("binary", 2, border=False, flips=False, intensity_jitter=False)
    for y, x in [(0, 0), (24, 34), (10, 5)]:
        inputs, target, weights = cut_sample(image, labels, y, x, geometry, spec, rng)
        expected = read_window(image, y - 20, x - 20, 56).astype(np.float32) / 255
        assert np.allclose(inputs.transpose(1, 2, 0), expected)
        assert np.array_equal(target, read_window(labels, y, x, 16))
        assert np.allclose(weights, 1.0)
    padded = np.pad(image, ((20, 20), (20, 20), (0, 0)), mode="symmetric")
    assert np.allclose(cut_sample(image, labels, 0, 0, geometry, spec, rng)[0].transpose(1, 2, 0), padded[:56, :56] / 255)


def test_stain_jitter_keeps_range_and_zero_jitter_is_identity():
    rng = np.random.default_rng(0)
    rgb = rng.random((32, 32, 3)).astype(np.float32) * 0.8 + 0.1
    out = augment.stain_jitter(rgb, rng)
    assert out.shape == rgb.shape and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, rgb)
    assert np.allclose(augment.stain_jitter(rgb, rng, 0, 0, 0, 0), rgb)


def test_flip_rotate_covers_the_eight_symmetries():
    a = np.arange(9).reshape(3, 3)
    outs = {augment.flip_rotate([a], k)[0].tobytes() for k in range(8)}
    assert len(outs) == 8


# --------------------------------------------------------------------------- metrics and data helpers
def test_adapted_rand_error_hand_cases():
    truth = np.array([[1, 1, 2, 2]])
    assert adapted_rand_error(truth, truth * 7 + 3) == pytest.approx(0.0)  # relabelling is free
    # merging the two objects: sum_a = 8, sum_b = 16, sum_ab = 8 -> P = 1/2, R = 1, F = 2/3
    assert adapted_rand_error(truth, np.ones_like(truth)) == pytest.approx(1 / 3)
    # ground-truth background (0) is ignored whatever the prediction there
    assert adapted_rand_error(np.array([[0, 1, 1]]), np.array([[5, 2, 2]])) == pytest.approx(0.0)
    # rand_error on class maps: one foreground blob predicted as one blob -> 0
    classes = np.zeros((10, 10), int)
    classes[2:5, 2:5] = 1
    assert rand_error(classes, classes) == 0.0


def test_metric_totals_sum_over_images():
    totals = MetricTotals()
    truth = np.array([[0, 1], [1, 1]])
    totals.add(truth, np.array([[0, 1], [0, 1]]))
    totals.add(truth, truth)
    summary = MetricTotals.from_vector(totals.as_vector()).summary()
    assert summary["pixel_error"] == pytest.approx(1 / 8)
    assert summary["dice"] == pytest.approx(2 * 5 / (2 * 5 + 0 + 1))


def test_epoch_sampler_shards_evenly_and_changes_every_epoch():
    shards = [EpochSampler(10, rank, 3, seed=0) for rank in range(3)]
    first = [list(s) for s in shards]
    assert all(len(f) == 4 for f in first)  # padded so every DDP rank runs the same steps
    assert set(sum(first, [])) == set(range(10))
    for s in shards:
        s.set_epoch(1)
    second = [list(s) for s in shards]
    assert all(10 <= i < 20 for i in sum(second, []))
    assert [i - 10 for i in second[0]] != first[0]


def test_label_mode_detection_and_split():
    assert detect_label_mode([np.array([[0, 255]], np.uint8)]) == "binary"
    assert detect_label_mode([np.array([[0, 1, 2]], np.uint8)]) == "classes"
    assert detect_label_mode([np.array([[0, 300]], np.uint16)]) == "instances"
    train, val = split_names([f"{i:02d}" for i in range(30)], ["2[5-9]"], 0.0)
    assert val == ["25", "26", "27", "28", "29"] and len(train) == 25


# --------------------------------------------------------------------------- Ray Train end to end
def write_disk_data(folder: Path, count: int, size: int = 48, seed: int = 0) -> None:
    """Grey images of bright disks on dark noise with binary labels (0 / 255)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir(parents=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(count):
        mask = np.zeros((size, size), bool)
        for _ in range(5):
            cy, cx, r = rng.integers(4, size - 4), rng.integers(4, size - 4), rng.integers(3, 7)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image = np.clip(40 + 150 * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"{i:02d}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / "labels" / f"{i:02d}.png")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ray_train_two_workers_learns_checkpoints_resumes_and_exports(ray_local, tmp_path):
    from pipeline.inference.engine import segment_slide
    from pipeline.store.output_store import open_labels
    from unet import load_model
    from pipeline.training import TrainConfig, fit

    write_disk_data(tmp_path / "data", 6)
    settings = dict(
        data=[str(tmp_path / "data")], val_files=["04", "05"], base_channels=4, depth=2, output_size=16,
        batch_size=2, samples_per_epoch=16, optimizer="adam", lr=0.02, elastic=True, loader_workers=0,
        val_tile=16, class_names=["background", "disk"], mpp=0.5,
    )  # fmt: skip
    storage = tmp_path / "runs"
    fit(TrainConfig(**settings, epochs=3), "tiny", storage, num_workers=2)
    run_dir = storage / "tiny"
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]  # it learns
    assert {"val_pixel_error", "val_dice", "val_rand_error"} <= set(rows[-1])
    checkpoints = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "state.pt").is_file() and (checkpoints[-1] / "model.pt").is_file()
    assert torch.load(checkpoints[-1] / "state.pt", weights_only=True)["epoch"] == 2

    # same name and storage path: resumes after epoch 2 instead of starting again
    result = fit(TrainConfig(**settings, epochs=4), "tiny", storage, num_workers=2, export=tmp_path / "exported.pt")
    rows = read_metrics(run_dir)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["start_epoch"] == 3 and result.metrics["epoch"] == 3

    # the exported best model is a regular artifact that segments a slide
    model = load_model(tmp_path / "exported.pt")
    assert model.card.class_names == ["background", "disk"] and model.card.mpp == 0.5
    assert model.card.metadata["val_images"] == ["04", "05"]
    slide = np.asarray(Image.open(tmp_path / "data" / "images" / "05.png"))
    segment_slide(slide[..., None], tmp_path / "out.zarr", model, tile_size=16)
    labels = np.asarray(open_labels(tmp_path / "out.zarr")[:])
    assert labels.shape == slide.shape and set(np.unique(labels)) <= {0, 1}


@pytest.mark.slow
def test_the_train_command_prints_each_epoch_once_and_no_traceback(tmp_path):
    """What a user sees of ``python jobs/train_unet.py``: Ray Train patches ``print`` in its workers so that a
    printed line reached the console twice; Ray's GCS time-outs used to print tracebacks at shutdown."""
    write_disk_data(tmp_path / "data", 4)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_unet.py"), "--data", str(tmp_path / "data"), "--val-files", "03",
         "--base-channels", "4", "--depth", "2", "--output-size", "16", "--batch-size", "2", "--samples-per-epoch", "8",
         "--epochs", "2", "--loader-workers", "0", "--val-tile", "16", "--num-workers", "1", "--cpus-per-worker", "1",
         "--class-names", "background", "disk", "--mpp", "0.5", "--name", "cli", "--storage-path", str(tmp_path / "runs"),
         "--export", str(tmp_path / "model.pt")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for epoch in (1, 2):
        lines = [line for line in output.splitlines() if f"epoch {epoch}/2 | loss" in line]
        assert len(lines) == 1, output[-3000:]
    assert "Traceback" not in output and "RpcError" not in output, output[-3000:]
    assert (tmp_path / "model.pt").is_file()


def test_train_cli_help_documents_the_options():
    out = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_unet.py"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for option in ("--data", "--num-workers", "--use-gpu", "--weight-map", "--elastic", "--amp", "--name",
                   "--storage-path", "--max-failures", "--export", "--preset", "--optimizer"):  # fmt: skip
        assert option in out.stdout


def test_train_cli_presets_map_to_the_paper_configuration():
    sys.path.insert(0, str(REPO / "jobs"))
    try:
        import train_unet
    finally:
        sys.path.remove(str(REPO / "jobs"))
    shared_file("isbi2012")  # the preset's data must exist: the CLI checks paths before starting Ray
    cfg = train_unet.config_from_args(train_unet.parse_args(["--preset", "paper-isbi", "--epochs", "1"]))
    assert (cfg.base_channels, cfg.depth, cfg.padding, cfg.optimizer, cfg.momentum, cfg.batch_size) == (64, 4, "valid", "sgd", 0.99, 1)
    assert cfg.weight_map and cfg.elastic and cfg.w0 == 10 and cfg.sigma == 5 and cfg.epochs == 1
    assert cfg.val_files == ["25", "26", "27", "28", "29"]
    cfg = train_unet.config_from_args(train_unet.parse_args(["--data", str(REPO), "--no-weight-map", "--image-mpp", "a*=0.25"]))
    assert not cfg.weight_map and cfg.image_mpp == {"a*": 0.25}
    own = train_unet.parse_args(["--preset", "nuclei", "--data", str(shared_file("isbi2012"))])  # replaces, not adds
    assert own.data == [str(shared_file("isbi2012").resolve())] and not own.val_files
    again = train_unet.parse_args(["--preset", "nuclei"])  # and the preset's own list is untouched by that
    assert again.data == [str(Path(p).resolve()) for p in train_unet.PRESETS["nuclei"]["data"]]


def test_whole_slide_patches_are_sampled_on_tissue(tmp_path):
    """A TIFF slide (tissue in its top-left quarter, glass elsewhere) with a Zarr label mask: patches come
    from the tissue, labels line up with the slide's pixels."""
    import tifffile
    import zarr

    from pipeline.training import TrainConfig
    from pipeline.training.build import build_data, build_dataset, build_model

    rng = np.random.default_rng(0)
    size = 512
    slide = np.full((size, size, 3), 245, np.uint8)
    tissue = np.zeros((size, size), bool)
    tissue[:200, :200] = True
    slide[tissue] = (rng.normal([200, 120, 170], 10, (tissue.sum(), 3))).clip(0, 255).astype(np.uint8)
    labels = np.zeros((size, size), np.uint16)
    labels[50:70, 50:70], labels[120:140, 30:50] = 1, 2
    slide[labels > 0] = (90, 40, 140)
    tifffile.imwrite(tmp_path / "slide.tif", slide, tile=(256, 256))
    store = zarr.open_array(str(tmp_path / "labels.zarr"), mode="w", shape=labels.shape, dtype=labels.dtype, chunks=(128, 128))
    store[:] = labels

    cfg = TrainConfig(slides=[[str(tmp_path / "slide.tif"), str(tmp_path / "labels.zarr")]], label_mode="instances",
                      base_channels=4, depth=2, output_size=32, samples_per_epoch=12, flips=False,
                      intensity_jitter=False, normalize_inputs=False)  # fmt: skip
    data = build_data(cfg)
    assert data.in_channels == 3 and data.num_classes == 2 and data.label_mode == "instances"
    source = data.train_sources[0]
    origins = np.array([source.sample_origin(np.random.default_rng(i), 32) for i in range(200)])
    centres = origins + 16
    assert (centres < 210).all()  # every patch centre lies on (or at the rim of) the tissue
    dataset = build_dataset(cfg, data, build_model(cfg, data))
    halo = dataset.geometry.halo
    for index in range(len(dataset)):
        inputs, target, weights = dataset[index]
        centre = inputs[:, halo:-halo, halo:-halo].numpy()
        # nucleus pixels (purple) in the input are exactly the labelled pixels of the target
        purple = np.isclose(centre[0], 90 / 255, atol=1e-6) & np.isclose(centre[1], 40 / 255, atol=1e-6)
        assert np.array_equal(purple, target.numpy() == 1)


def test_in_process_local_mode_resumes_from_its_own_checkpoint(tmp_path):
    """num_workers=0 runs the loop in this process (Ray Train local mode); the loop keeps its last state in
    the run directory so a rerun still resumes."""
    from pipeline.training import TrainConfig, fit

    write_disk_data(tmp_path / "data", 3, size=32)
    settings = dict(data=[str(tmp_path / "data")], val_files=["02"], base_channels=4, depth=2, output_size=16,
                    samples_per_epoch=4, batch_size=2, loader_workers=0, val_tile=16)  # fmt: skip
    fit(TrainConfig(**settings, epochs=1), "local", tmp_path / "runs", num_workers=0)
    fit(TrainConfig(**settings, epochs=2), "local", tmp_path / "runs", num_workers=0)
    rows = read_metrics(tmp_path / "runs" / "local")
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["start_epoch"] == 1
    assert (tmp_path / "runs" / "local" / "best-model.pt").is_file()


def test_a_model_without_mpp_or_real_class_names_is_reported_loudly_at_the_end():
    from pipeline.training.trainer import card_warnings
    from unet.model import ModelCard

    bare = card_warnings(ModelCard(class_names=["background", "foreground"], mpp=None))
    assert len(bare) == 2 and "no µm/px" in bare[0] and "--class-names" in bare[1]
    assert card_warnings(ModelCard(class_names=["background", "nucleus"], mpp=0.5)) == []


def test_rank_zero_shows_progress_within_a_long_epoch(capsys, monkeypatch):
    from pipeline.training import loop

    clock = iter([0.0, 10.0, 40.0, 41.0, 0.0, 50.0])  # start, then three steps; a quiet rank's start and step
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    progress = loop.EpochProgress(0, 5, batches=100, limit=None, show=True, every=30.0)
    progress.step(1, 0.9, 4)   # 10 s in: too soon
    progress.step(4, 0.7, 16)  # 40 s in: a line
    progress.step(5, 0.6, 20)  # 1 s later: too soon again
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/5: step 4/100, loss 0.7000, 0.4 samples/s, ~960 s left")
    quiet = loop.EpochProgress(0, 5, batches=100, limit=None, show=False, every=0.0)
    quiet.step(50, 0.5, 200)
    assert capsys.readouterr().out == ""  # the other ranks print nothing
