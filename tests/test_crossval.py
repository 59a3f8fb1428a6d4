"""Cross-validation of the nuclei model: the fold split, the whole job end to end on a tiny untrained model and
two small images (fake training, a synthetic slide for the hard negatives), and the classical baselines on a
real image."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.training.crossval import Fold, fold_train_args, magnification_group, make_folds, model_instances
from pipeline.training.files import mpp_for
from tests.conftest import random_image, shared_file, varied_unet, write_pyramid_tiff
from unet import save_model

REPO = Path(__file__).resolve().parents[1]
STEMS = ["image01", "image02", "image03", "image05", "image06", "image07",
         "image08", "image09", "image11", "image12", "image14", "image15"]  # fmt: skip


def load_job():
    spec = importlib.util.spec_from_file_location("cross_validate", REPO / "jobs" / "cross_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


job = load_job()


def test_folds_hold_out_every_image_once_and_mix_resolutions():
    folds = make_folds(list(reversed(STEMS)), 4)
    held = [s for f in folds for s in f.held_out]
    assert sorted(held) == STEMS and len(set(held)) == 12
    assert folds[1] == Fold(1, ("image02", "image07", "image12"))
    for fold in folds:
        groups = {magnification_group(mpp_for(f"{s}.png", job.NUCLEI_MPP)) for s in fold.held_out}
        assert groups == {"20x", "40x"}, fold
    args = fold_train_args(folds[0], "/runs", ["--epochs", "3"])
    assert args[args.index("--val-files") + 1 : args.index("--best-metric")] == list(folds[0].held_out)
    assert args[-2:] == ["--epochs", "3"] and "epoch" in args and "cv-fold-0" in args
    with pytest.raises(ValueError):
        make_folds(STEMS[:3], 4)


def test_requested_epochs_from_the_user_else_the_preset():
    assert job.requested_epochs(["--num-workers", "1", "--epochs", "7"]) == 7
    assert job.requested_epochs([]) == job.PRESETS["nuclei"].get("epochs", 10)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """image01 (20x, 0.5 µm/px) and image08 (40x, resampled by 2): dark disks on noise, their instance labels."""
    for name, size in (("image01", 72), ("image08", 120)):
        image = (150 + 0.3 * random_image(size, size, seed=len(name) + size)).astype(np.uint8)
        label = np.zeros((size, size), np.uint16)
        yy, xx = np.mgrid[:size, :size]
        for k, (y, x) in enumerate([(20, 20), (20, 34), (50, 45)], 1):
            disk = (yy - y * size / 72) ** 2 + (xx - x * size / 72) ** 2 <= (6 * size / 72) ** 2
            label[disk], image[disk] = k, (60, 30, 120)
        for folder, pixels in (("images", image), ("labels", label)):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / "data" / folder / f"{name}.png")
    slide = np.full((160, 200, 3), 230, np.uint8)
    slide[40:80, 50:120] = (90, 60, 150)  # a dark smear a model may call nucleus
    write_pyramid_tiff(tmp_path / "slide.tiff", slide, ((160, 200),), mpp=0.5)
    regions = [{"name": "smear", "kind": "smear", "box": [40, 50, 80, 120], "split": "eval"},
               {"name": "glass", "kind": "background", "box": [100, 10, 150, 60], "split": "eval"},
               {"name": "train-only", "kind": "smear", "box": [0, 0, 20, 20], "split": "train"}]  # fmt: skip
    (tmp_path / "negatives.json").write_text(json.dumps({"slide": "slide.tiff", "mpp": 0.5, "regions": regions}))
    return tmp_path


def fake_trainer(calls: list, leak: bool = False, record_recipe: bool = False):
    """Stands in for train_unet.main: writes the fold's best-model.pt (an untrained tiny U-Net) as epoch 0, and with
    ``record_recipe`` the recipe training would record for these arguments."""

    def train(args: list[str]) -> None:
        calls.append(args)
        held = args[args.index("--val-files") + 1 : args.index("--best-metric")]
        run = Path(args[args.index("--storage-path") + 1]) / args[args.index("--name") + 1]
        run.mkdir(parents=True, exist_ok=True)
        train_images = [s for s in ("image01", "image08") if leak or s not in held]
        recipe = {}
        if record_recipe:
            import train_unet

            from pipeline.training.loop import recipe_of

            recipe = {"recipe": recipe_of(train_unet.config_from_args(train_unet.parse_args(args)))}
        save_model(varied_unet(num_classes=2), run / "best-model.pt", class_names=["background", "nucleus"], mpp=0.5,
                   epoch=0, train_images=train_images, **recipe)  # fmt: skip

    return train


def common(tmp_path: Path) -> list[str]:
    return ["--data", str(tmp_path / "data"), "--storage-path", str(tmp_path / "runs"), "--folds", "2",
            "--hard-negatives", str(tmp_path / "negatives.json"), "--slides-dir", str(tmp_path), "--device", "cpu"]  # fmt: skip


def test_cross_validation_end_to_end_then_skips_trained_folds(tiny_data, capsys):
    calls: list = []
    report = job.main([*common(tiny_data), "--epochs", "1"], train=fake_trainer(calls))
    assert len(calls) == 2 and all(c[-2:] == ["--epochs", "1"] for c in calls)
    assert report["mode"] == "cross-validation" and report["command"].startswith("python jobs/cross_validate.py")
    assert {"date_utc", "host", "torch", "git_commit"} <= set(report["machine"])
    assert [r["held_out"] for r in report["runs"]] == [["image01"], ["image08"]]
    rows = {r["image"]: r for r in report["images"]}
    assert (rows["image01"]["group"], rows["image08"]["group"]) == ("20x", "40x")
    assert rows["image01"]["fold"] == 0 and rows["image01"]["seen_in_training"] is False
    for row in rows.values():
        for method in ("model", "otsu", "watershed"):
            assert {"dice", "f1", "aji", "tp", "fp", "fn", "precision", "recall"} <= set(row[method])
            assert all(0 <= row[method][k] <= 1 for k in ("dice", "f1", "aji"))
    assert rows["image01"]["otsu"]["dice"] > 0.9  # dark disks on a pale background
    summary = report["summary"]
    assert set(summary["by_group"]) == {"20x", "40x"} and set(summary["by_fold"]) == {"0", "1"}
    assert set(summary["overall"]["model"]) == {"mean", "pooled"} and "caveat" not in report
    hard = report["hard_negatives"]["models"]
    assert set(hard) == {"cv-fold-0", "cv-fold-1", "otsu", "watershed"}
    assert [r["region"] for r in hard["otsu"]["regions"]] == ["smear", "glass"]  # eval regions only
    assert hard["otsu"]["summary"]["by_kind"]["smear"] > 0.9 and hard["otsu"]["summary"]["by_kind"]["background"] == 0
    saved = json.loads((tiny_data / "runs" / "cross-validation.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(summary)) and len(saved["figures"]) == 2
    assert all((tiny_data / "runs" / f).is_file() for f in saved["figures"])
    table = capsys.readouterr().out
    assert "| image | group | fold |" in table and "| **all** | 2 | pooled |" in table and "smear" in table

    def refuse(args):
        raise AssertionError("a trained fold was trained again")

    quick = ["--figures", "0", "--hard-negatives", str(tiny_data / "absent.json")]  # argparse: the last one wins
    again = job.main([*common(tiny_data), "--epochs", "1", "--fold", "1", *quick], train=refuse)
    assert [r["trained_now"] for r in again["runs"]] == [False]


def test_fold_runs_of_another_recipe_are_refused_not_scored_as_this_one(tiny_data):
    def refuse(args):
        raise AssertionError("a trained fold was trained again")

    quick = ["--epochs", "1", "--figures", "0", "--hard-negatives", str(tiny_data / "absent.json")]
    job.main([*common(tiny_data), *quick], train=fake_trainer([], record_recipe=True))
    again = job.main([*common(tiny_data), *quick], train=refuse)  # the same recipe: the trained folds are reused
    assert [r["trained_now"] for r in again["runs"]] == [False, False]
    with pytest.raises(ValueError, match=r"cv-fold-0: its model was trained with core=0.0 \(asked: 0.4\)"):
        job.main([*common(tiny_data), *quick, "--core", "0.4"], train=refuse)


def test_a_fold_model_that_saw_its_held_out_images_is_refused(tiny_data):
    with pytest.raises(ValueError, match="trained on held-out images"):
        job.main([*common(tiny_data), "--epochs", "1"], train=fake_trainer([], leak=True))


def test_evaluate_only_marks_images_the_model_trained_on(tiny_data):
    path = tiny_data / "old.pt"
    save_model(
        varied_unet(num_classes=2), path, class_names=["background", "nucleus"], mpp=0.5, train_images=["image08"]
    )
    report = job.main([*common(tiny_data), "--evaluate-only", str(path), "--out", str(tiny_data / "out")])
    assert {r["image"]: r["seen_in_training"] for r in report["images"]} == {"image01": False, "image08": True}
    assert "trained on some" in report["caveat"] and report["summary_unseen_only"]["overall"]["images"] == 1
    assert set(report["hard_negatives"]["models"]) == {"old.pt", "otsu", "watershed"}
    assert (tiny_data / "out" / "evaluate-old.json").is_file()


def test_instances_follow_the_model_rule_else_components():
    classes = np.zeros((12, 12), np.int64)
    classes[2:6, 2:10] = 2  # one rim-connected blob with two interiors: the rule splits it, components do not
    classes[3:5, 3:5] = classes[3:5, 7:9] = 1
    model = varied_unet(num_classes=3)
    assert model_instances(model, classes).max() == 1
    model.card.metadata["instances"] = {"grow_steps": 1, "min_seed_area": 1}
    assert model_instances(model, classes).max() == 2


def test_baselines_find_nuclei_on_a_real_image():
    from pipeline.training.baseline import BASELINES
    from pipeline.training.crossval import load_eval_images
    from pipeline.training.metrics import instance_scores

    folder = shared_file("nuclei/images/image01.png").parents[1]
    item = load_eval_images(folder, job.NUCLEI_MPP, ["image01"])[0]
    found = {}
    for name, baseline in BASELINES.items():
        mask, ids = baseline(item.image)
        assert mask.dtype == bool and mask.shape == ids.shape == item.truth.shape
        assert np.array_equal(mask, ids > 0)
        assert 0.05 < mask.mean() < 0.5
        found[name] = int(ids.max())
        assert instance_scores(item.truth, ids).dice > 0.5
    assert found["watershed"] >= found["otsu"]  # the watershed only splits


@pytest.mark.parametrize("rim", [dict(boundary_width=1), dict(boundary_width=1, contact_width=2),
                                 dict(boundary_width=1, core=0.4)], ids=["rim", "contact-band", "core"])  # fmt: skip
def test_training_targets_give_the_annotated_nuclei_back_through_the_models_instance_rule(rim):
    """The ceiling of a target form: the true instances cut into interior and boundary classes as training cuts
    them, then turned back into instances by the rule training writes into the model, on all 12 real images."""
    from pipeline.analysis.instances import InstanceRule, label_instances
    from pipeline.training.config import TrainConfig
    from pipeline.training.crossval import load_eval_images
    from pipeline.training.files import to_classes
    from pipeline.training.loop import instance_metadata
    from pipeline.training.metrics import InstanceScores, instance_scores

    folder = shared_file("nuclei/images/image01.png").parents[1]
    cfg = TrainConfig(data=[str(folder)], **rim)
    rule = InstanceRule.from_dict(instance_metadata(cfg)["instances"])
    scores = [instance_scores(item.truth, label_instances(to_classes(item.truth, "instances", 3, cfg.rim).astype(np.uint8), rule))
              for item in load_eval_images(folder, job.NUCLEI_MPP)]  # fmt: skip
    pooled = InstanceScores.pooled(scores)
    assert len(scores) == 12 and pooled.dice > 0.99 and pooled.aji > 0.95 and pooled.objects.f1 > 0.95
