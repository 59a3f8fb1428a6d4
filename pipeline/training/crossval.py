"""Leave-images-out cross-validation of the nuclei model, with classical baselines on the same images.

Why: 12 annotated images are too few for one fixed split to say much, and a model must never be scored
on an image that trained it or chose its epoch. The sorted stems are dealt into ``k`` folds (fold i holds
out ``stems[i::k]``, so with the nuclei data each fold mixes 20x and 40x images); each fold's model is
trained on the other images (with ``--best-metric epoch``: the last epoch is exported, so the held-out
images select nothing) and scored only on its held-out images at 0.5 µm/px, beside the baselines of
:mod:`pipeline.training.baseline`. Scores: foreground Dice, object F1 at IoU > 0.5 and the aggregated
Jaccard index (:mod:`pipeline.training.metrics`). Reports: :mod:`pipeline.training.cv_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from pipeline.analysis.instances import InstanceRule, label_instances
from pipeline.training.baseline import BASELINES
from pipeline.training.evaluate import predict_region
from pipeline.training.files import folder_pairs, load_records, mpp_for
from pipeline.training.metrics import InstanceScores, instance_scores

logger = logging.getLogger(__name__)

EVAL_MPP = 0.5
METHODS = ("model", *BASELINES)
SCORES = ("dice", "f1", "aji")


@dataclass(frozen=True)
class Fold:
    index: int
    held_out: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"cv-fold-{self.index}"


def make_folds(stems: list[str], k: int = 3) -> list[Fold]:
    """Fold i holds out ``sorted(stems)[i::k]``: every image exactly once, deterministic, no randomness to seed."""
    stems = sorted(stems)
    if not 2 <= k <= len(stems):
        raise ValueError(f"need 2 <= folds <= {len(stems)} images, got {k}")
    return [Fold(i, tuple(stems[i::k])) for i in range(k)]


def magnification_group(mpp: float | None) -> str:
    """The group "20x" for ~0.5 µm/px, "40x" for ~0.25 µm/px (the scan's own resolution, before resampling)."""
    return f"{round(10 / mpp)}x" if mpp else "unknown"


@dataclass
class EvalImage:
    """One annotated image at the evaluation resolution: RGB pixels and the true instance ids."""

    name: str
    group: str
    image: np.ndarray
    truth: np.ndarray


def load_eval_images(data_dir: str | Path, image_mpp: dict[str, float], names: list[str] | None = None,
                     mpp: float = EVAL_MPP) -> list[EvalImage]:  # fmt: skip
    """The pairs of ``data_dir`` (only ``names`` if given), resampled to ``mpp`` as training resamples them
    (image: the inference resampler; labels: nearest neighbour at the same pixel centres)."""
    pairs = [p for p in folder_pairs(data_dir) if names is None or p[0] in names]
    missing = set(names or ()) - {p[0] for p in pairs}
    if missing:
        raise FileNotFoundError(f"{data_dir}: no image/label pair for {sorted(missing)}")
    records = load_records(pairs, image_mpp, mpp)
    return [EvalImage(r.name, magnification_group(mpp_for(path.name, image_mpp)), r.image, r.label)
            for r, (_, path, _) in zip(records, pairs)]  # fmt: skip


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def predict_classes(model: torch.nn.Module, image: np.ndarray, tile_size: int = 256, device: str = "cpu") -> np.ndarray:
    """Class map of a whole image, tiled as inference tiles it, in float32 (amp off: scores must not depend
    on the GPU's precision)."""
    logits = predict_region(model, image, (0, 0, *image.shape[:2]), tile_size, 4, device, None, False)
    return logits.argmax(0)


def model_instances(model: torch.nn.Module, classes: np.ndarray) -> np.ndarray:
    """Instances by the model's own rule (``model.card.metadata["instances"]``, the one the slide job applies);
    a model without one (e.g. the old 2-class model) gets the 8-connected components of class > 0, so both
    kinds are scored alike."""
    rule = InstanceRule.from_card(model.card)
    if rule is None:
        return ndimage.label(classes > 0, np.ones((3, 3), bool))[0].astype(np.uint32)
    return label_instances(classes, rule)


@dataclass
class ImageResult:
    """Scores of every method on one image, and the maps the failure figures draw."""

    name: str
    group: str
    fold: int | None
    scores: dict[str, InstanceScores]
    seen_in_training: bool | None = None
    maps: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return {"image": self.name, "group": self.group, "fold": self.fold, "seen_in_training": self.seen_in_training,
                **{method: s.to_dict() for method, s in self.scores.items()}}  # fmt: skip


def evaluate_images(model: torch.nn.Module | None, images: list[EvalImage], fold: int | None = None,
                    tile_size: int = 256, device: str = "cpu") -> list[ImageResult]:  # fmt: skip
    """Model (if any) and baselines on each image; ``seen_in_training`` from the card's ``train_images``."""
    trained_on = None if model is None else model.card.metadata.get("train_images")
    if model is not None:
        model.eval()
        if model.card.mpp is not None and abs(model.card.mpp / EVAL_MPP - 1) > 0.05:
            logger.warning("the model works at %.3g µm/px but is evaluated at %.3g µm/px", model.card.mpp, EVAL_MPP)
    results = []
    for item in images:
        scores, maps = {}, {}
        if model is not None:
            maps["model"] = model_instances(model, predict_classes(model, item.image, tile_size, device))
            scores["model"] = instance_scores(item.truth, maps["model"])
        for name, baseline in BASELINES.items():
            scores[name] = instance_scores(item.truth, baseline(item.image)[1])
        seen = None if trained_on is None else item.name in trained_on
        results.append(ImageResult(item.name, item.group, fold, scores, seen, maps))
        logger.info("%s (%s): %s", item.name, item.group,
                    ", ".join(f"{m} AJI {s.aji:.3f}" for m, s in scores.items()))  # fmt: skip
    return results


def methods_of(results: list[ImageResult]) -> tuple[str, ...]:
    """The methods scored on every image, in :data:`METHODS` order."""
    return tuple(m for m in METHODS if results and all(m in r.scores for r in results))


def summarize(results: list[ImageResult]) -> dict:
    """Per group, per fold and overall: the mean of the per-image scores and the pooled scores (all images
    taken as one)."""
    methods = methods_of(results)

    def block(rows: list[ImageResult]) -> dict:
        out: dict = {"images": len(rows)}
        for method in methods:
            scores = [r.scores[method] for r in rows]
            pooled = InstanceScores.pooled(scores)
            out[method] = {
                "mean": {k: float(np.mean([s.to_dict()[k] for s in scores])) for k in SCORES},
                "pooled": {k: pooled.to_dict()[k] for k in SCORES},
            }
        return out

    groups = sorted({r.group for r in results})
    folds = sorted({r.fold for r in results if r.fold is not None})
    return {
        "by_group": {g: block([r for r in results if r.group == g]) for g in groups},
        "by_fold": {str(f): block([r for r in results if r.fold == f]) for f in folds},
        "overall": block(results),
    }


# --------------------------------------------------------------------------- training the folds
def fold_train_args(fold: Fold, storage_path: str | Path, extra: list[str]) -> list[str]:
    """``jobs/train_unet.py`` arguments of one fold; ``extra`` (the user's, e.g. --epochs) come last and win."""
    return ["--preset", "nuclei", "--val-files", *fold.held_out, "--best-metric", "epoch", "--validate-every", "10",
            "--name", fold.name, "--storage-path", str(storage_path), *extra]  # fmt: skip


def fold_is_trained(run_dir: Path, epochs: int | None) -> bool:
    """best-model.pt exists and (when ``epochs`` is known) comes from the last epoch; else train or resume."""
    best = run_dir / "best-model.pt"
    if not best.is_file():
        return False
    if epochs is None:
        return True
    from unet import load_model

    return int(load_model(best).card.metadata.get("epoch", -1)) + 1 >= epochs


def check_recipe(model: torch.nn.Module, fold: Fold, expected: dict | None) -> None:
    """Refuse a fold model trained with other settings than the ones asked for now: a storage path reused for
    another recipe would otherwise be scored as this one. Settings a card does not record (cards older than the
    setting) count as their defaults; a card with no recipe at all (not from this training loop) is not checked."""
    recorded = model.card.metadata.get("recipe")
    if not expected or not isinstance(recorded, dict):
        return
    from pipeline.training.config import TrainConfig
    from pipeline.training.loop import recipe_of

    trained = {**recipe_of(TrainConfig(data=["-"])), **recorded}
    differ = [f"{k}={trained.get(k)!r} (asked: {v!r})" for k, v in expected.items() if trained.get(k) != v]
    if differ:
        raise ValueError(f"{fold.name}: its model was trained with {', '.join(differ)}; give another --storage-path "
                         "for this recipe, or delete the fold's run to retrain it")  # fmt: skip


def check_no_leak(model: torch.nn.Module, fold: Fold) -> None:
    """Refuse a fold model whose card says it trained on one of the fold's held-out images."""
    leaked = sorted(set(fold.held_out) & set(model.card.metadata.get("train_images") or ()))
    if leaked:
        raise ValueError(f"{fold.name}: the model trained on held-out images {leaked}; delete the run and retrain")


@dataclass
class ModelRun:
    """One evaluated model: a fold's (``fold`` set) or a given file's, with its per-image results."""

    label: str
    path: Path
    model: torch.nn.Module = field(repr=False)
    results: list[ImageResult]
    fold: Fold | None = None
    trained_now: bool = False

    def to_dict(self) -> dict:
        card = self.model.card
        return {"label": self.label, "model": str(self.path), "model_sha256": card.checksum,
                "epoch": card.metadata.get("epoch"), "train_images": card.metadata.get("train_images"),
                "fold": None if self.fold is None else self.fold.index,
                "held_out": None if self.fold is None else list(self.fold.held_out), "trained_now": self.trained_now,
                "summary": summarize(self.results)["overall"]}  # fmt: skip


def evaluate_file(path: str | Path, data_dir: str | Path, image_mpp: dict[str, float], tile_size: int = 256,
                  device: str = "cpu") -> ModelRun:  # fmt: skip
    """One saved model on every image of ``data_dir`` (``seen_in_training`` marks the ones it trained on)."""
    from unet import load_model

    model = load_model(path)
    images = load_eval_images(data_dir, image_mpp)
    results = evaluate_images(model, images, None, tile_size, resolve_device(device))
    return ModelRun(Path(path).name, Path(path), model, results)


@dataclass
class CrossValidation:
    """Where the data and the fold runs are, and how to train and evaluate them."""

    data_dir: Path
    image_mpp: dict[str, float]
    storage_path: Path
    folds: int = 3
    tile_size: int = 256
    device: str = "cpu"
    train_args: list[str] = field(default_factory=list)
    recipe: dict | None = None  # what the folds' cards must record (pipeline.training.loop.recipe_of); None: unchecked

    def run_fold(self, fold: Fold, train: Callable[[list[str]], object] | None, epochs: int | None = None) -> ModelRun:
        """Train the fold with ``train(args)`` unless its last epoch's best-model.pt exists (a partial run
        resumes), then score it on its held-out images. ``train`` None: only evaluate an existing run."""
        from unet import load_model

        run_dir = Path(self.storage_path).expanduser().resolve() / fold.name
        trained_now = not fold_is_trained(run_dir, epochs)
        if trained_now:
            if train is None:
                raise FileNotFoundError(f"{run_dir}/best-model.pt: fold {fold.index} is not trained")
            logger.info("%s: training without %s", fold.name, ", ".join(fold.held_out))
            train(fold_train_args(fold, self.storage_path, self.train_args))
        model = load_model(run_dir / "best-model.pt")
        check_no_leak(model, fold)
        check_recipe(model, fold, self.recipe)
        images = load_eval_images(self.data_dir, self.image_mpp, list(fold.held_out))
        results = evaluate_images(model, images, fold.index, self.tile_size, resolve_device(self.device))
        return ModelRun(fold.name, run_dir / "best-model.pt", model, results, fold, trained_now)

    def run(self, train: Callable[[list[str]], object] | None, epochs: int | None = None,
            only: list[int] | None = None) -> list[ModelRun]:  # fmt: skip
        """Every fold (or the ``only`` ones) in turn."""
        stems = [p[0] for p in folder_pairs(self.data_dir)]
        return [self.run_fold(fold, train, epochs) for fold in make_folds(stems, self.folds)
                if only is None or fold.index in only]  # fmt: skip
