"""Segmentation metrics: pixel error, foreground Dice/F1, the ISBI 2012 Rand error, and instance metrics
(object F1 at IoU > 0.5, aggregated Jaccard index) for nuclei.

Counts (not ratios) are accumulated so that metrics over several images, or over several Ray Train
workers, are exact sums (:class:`MetricTotals`).

Rand error (ISBI 2012 / SNEMI3D "adapted Rand error"): 1 - the F-score of the Rand split and merge
scores, restricted to the ground truth's foreground. Pixels whose ground-truth object id is 0 (boundary /
background) are ignored; predicted-background pixels inside the ground-truth foreground count as
singletons (each its own segment), as in the challenge's scoring script (the SNEMI3D ``adapted_rand``
formula, which counts pixel pairs including self-pairs; ``skimage.metrics.adapted_rand_error`` excludes
self-pairs and differs slightly). Objects are the connected components of the foreground of each map
(or a given instance map for the ground truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


def connected_components(foreground: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask (0 = background)."""
    labels, _ = ndimage.label(np.asarray(foreground, bool))
    return labels


def adapted_rand_error(true_ids: np.ndarray, pred_ids: np.ndarray) -> float:
    """1 - adapted Rand F-score of segmentation ``pred_ids`` against ``true_ids`` (0 = ignore / background).

    ``true_ids``, ``pred_ids``: non-negative integer object ids of the same shape. Equals 0 for a perfect
    segmentation (any relabelling), grows with splits and merges. Empty ground truth gives 0.
    """
    true_ids = np.asarray(true_ids).ravel().astype(np.int64)
    pred_ids = np.asarray(pred_ids).ravel().astype(np.int64)
    if true_ids.shape != pred_ids.shape:
        raise ValueError(f"shapes differ: {true_ids.shape} vs {pred_ids.shape}")
    n = true_ids.size
    keep = true_ids > 0
    if not keep.any():
        return 0.0
    t, p = true_ids[keep], pred_ids[keep]
    _, t = np.unique(t, return_inverse=True)
    _, p = np.unique(p, return_inverse=True)
    singletons = pred_ids[keep] == 0  # predicted background inside the ground-truth foreground
    # contingency table of (true, predicted) pairs, predicted background excluded (singletons)
    pairs = t[~singletons] * (p.max() + 1) + p[~singletons]
    _, counts = np.unique(pairs, return_counts=True)
    a_i = np.bincount(t, minlength=t.max() + 1).astype(np.float64)  # true sizes, incl. singletons
    b_j = np.bincount(p[~singletons], minlength=p.max() + 1).astype(np.float64)
    c = float(singletons.sum())
    sum_a = float((a_i**2).sum())
    sum_b = float((b_j**2).sum()) + c / n
    sum_ab = float((counts.astype(np.float64) ** 2).sum()) + c / n
    if sum_b == 0 or sum_a == 0:
        return 1.0
    precision, recall = sum_ab / sum_b, sum_ab / sum_a
    if precision + recall == 0:
        return 1.0
    return float(1.0 - 2.0 * precision * recall / (precision + recall))


def rand_error(true_classes: np.ndarray, pred_classes: np.ndarray, true_instances: np.ndarray | None = None) -> float:
    """ISBI 2012 Rand error from class maps: objects are the connected components of the foreground
    (class >= 1) of each map; ``true_instances`` replaces the ground truth's components when given."""
    truth = true_instances if true_instances is not None else connected_components(np.asarray(true_classes) > 0)
    return adapted_rand_error(truth, connected_components(np.asarray(pred_classes) > 0))


@dataclass
class MetricTotals:
    """Sums over images: pixel counts for pixel error and foreground Dice, and per-image Rand errors."""

    pixels: int = 0
    wrong: int = 0
    tp: int = 0  # foreground = any class >= 1
    fp: int = 0
    fn: int = 0
    rand_sum: float = 0.0
    images: int = 0
    loss_sum: float = 0.0
    loss_pixels: int = 0
    extra: dict = field(default_factory=dict)

    def add(self, true_classes: np.ndarray, pred_classes: np.ndarray, true_instances: np.ndarray | None = None) -> None:
        true_classes, pred_classes = np.asarray(true_classes), np.asarray(pred_classes)
        if true_classes.shape != pred_classes.shape:
            raise ValueError(f"shapes differ: {true_classes.shape} vs {pred_classes.shape}")
        t_fg, p_fg = true_classes > 0, pred_classes > 0
        self.pixels += int(true_classes.size)
        self.wrong += int((true_classes != pred_classes).sum())
        self.tp += int((t_fg & p_fg).sum())
        self.fp += int((~t_fg & p_fg).sum())
        self.fn += int((t_fg & ~p_fg).sum())
        self.rand_sum += rand_error(true_classes, pred_classes, true_instances)
        self.images += 1

    def as_vector(self) -> np.ndarray:
        return np.array(
            [
                self.pixels,
                self.wrong,
                self.tp,
                self.fp,
                self.fn,
                self.rand_sum,
                self.images,
                self.loss_sum,
                self.loss_pixels,
            ],
            dtype=np.float64,
        )

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> MetricTotals:
        v = [float(x) for x in vector]
        return cls(int(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]), v[5], int(v[6]), v[7], int(v[8]))

    def summary(self) -> dict[str, float]:
        """pixel_error, dice (foreground F1), rand_error (mean over images), loss (if accumulated)."""
        out = {
            "pixel_error": self.wrong / self.pixels if self.pixels else float("nan"),
            "dice": 2 * self.tp / (2 * self.tp + self.fp + self.fn) if (self.tp + self.fp + self.fn) else 1.0,
            "rand_error": self.rand_sum / self.images if self.images else float("nan"),
        }
        if self.loss_pixels:
            out["loss"] = self.loss_sum / self.loss_pixels
        return out


def dice(true_classes: np.ndarray, pred_classes: np.ndarray) -> float:
    """Foreground Dice (= F1) of two class maps (foreground = class >= 1)."""
    t, p = np.asarray(true_classes) > 0, np.asarray(pred_classes) > 0
    denominator = t.sum() + p.sum()
    return float(2 * (t & p).sum() / denominator) if denominator else 1.0


def pixel_error(true_classes: np.ndarray, pred_classes: np.ndarray) -> float:
    """Fraction of pixels whose class differs."""
    return float((np.asarray(true_classes) != np.asarray(pred_classes)).mean())


# --------------------------------------------------------------------------- instance metrics (nuclei)
@dataclass(frozen=True)
class Overlaps:
    """Sparse intersection table of two instance maps: object areas and every overlapping (true, pred) pair.

    Objects are renumbered 0..n-1 in the order of their ids; ``true_index[k]``/``pred_index[k]`` overlap by
    ``intersection[k]`` pixels. Only pairs that share a pixel are listed, which at nucleus densities is a
    few per object, so no dense n_true x n_pred matrix is ever built."""

    true_area: np.ndarray
    pred_area: np.ndarray
    true_index: np.ndarray
    pred_index: np.ndarray
    intersection: np.ndarray

    @property
    def union(self) -> np.ndarray:
        return self.true_area[self.true_index] + self.pred_area[self.pred_index] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        return self.intersection / np.maximum(self.union, 1)


def _compact(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Object ids renumbered 1..n in id order (0 stays background) and n."""
    values, inverse = np.unique(ids, return_inverse=True)
    if values.size and values[0] != 0:
        inverse = inverse + 1
    count = int(values.size - (values.size > 0 and values[0] == 0))
    return inverse.reshape(-1).astype(np.int64), count


def instance_overlaps(true_ids: np.ndarray, pred_ids: np.ndarray) -> Overlaps:
    """The :class:`Overlaps` of two (H, W) instance maps (non-negative ids, 0 = no object)."""
    true_ids, pred_ids = np.asarray(true_ids), np.asarray(pred_ids)
    if true_ids.shape != pred_ids.shape:
        raise ValueError(f"shapes differ: {true_ids.shape} vs {pred_ids.shape}")
    if (true_ids.size and true_ids.min() < 0) or (pred_ids.size and pred_ids.min() < 0):
        raise ValueError("instance ids must be non-negative")
    t, n_true = _compact(true_ids.ravel())
    p, n_pred = _compact(pred_ids.ravel())
    both = (t > 0) & (p > 0)
    codes, counts = np.unique(t[both] * (n_pred + 1) + p[both], return_counts=True)
    return Overlaps(
        true_area=np.bincount(t, minlength=n_true + 1)[1:].astype(np.int64),
        pred_area=np.bincount(p, minlength=n_pred + 1)[1:].astype(np.int64),
        true_index=codes // (n_pred + 1) - 1,
        pred_index=codes % (n_pred + 1) - 1,
        intersection=counts.astype(np.int64),
    )


@dataclass(frozen=True)
class ObjectScores:
    """Object detection at IoU > 0.5: a predicted object matches a true one when their IoU exceeds 0.5 (such
    matches are one-to-one, since two objects cannot both cover more than half of a third's union)."""

    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp + self.fp + self.fn else 1.0


def object_scores(true_ids: np.ndarray, pred_ids: np.ndarray, overlaps: Overlaps | None = None) -> ObjectScores:
    """TP/FP/FN of predicted objects against true objects, matched one-to-one at IoU > 0.5."""
    o = overlaps or instance_overlaps(true_ids, pred_ids)
    tp = int((o.iou > 0.5).sum())
    return ObjectScores(tp=tp, fp=o.pred_area.size - tp, fn=o.true_area.size - tp)


def aji_counts(true_ids: np.ndarray, pred_ids: np.ndarray, overlaps: Overlaps | None = None) -> tuple[int, int]:
    """(intersection, union) sums of the aggregated Jaccard index (Kumar et al. 2017, IEEE TMI 36(7)).

    Each true object is paired with the predicted object of highest IoU (ties: the lower id); their
    intersection and union are summed (a true object overlapping nothing adds its area to the union), and
    every predicted object paired with no true object adds its area to the union. A predicted object may
    be paired with several true ones (a merge), which the index then penalises by counting it repeatedly."""
    o = overlaps or instance_overlaps(true_ids, pred_ids)
    order = np.lexsort((o.pred_index, -o.iou, o.true_index))  # per true object: best IoU first
    first = np.ones(order.size, bool)
    first[1:] = o.true_index[order][1:] != o.true_index[order][:-1]
    best = order[first]
    used = np.zeros(o.pred_area.size, bool)
    used[o.pred_index[best]] = True
    unpaired_true = np.ones(o.true_area.size, bool)
    unpaired_true[o.true_index[best]] = False
    intersection = int(o.intersection[best].sum())
    union = int(o.union[best].sum() + o.true_area[unpaired_true].sum() + o.pred_area[~used].sum())
    return intersection, union


def aggregated_jaccard(true_ids: np.ndarray, pred_ids: np.ndarray) -> float:
    """Aggregated Jaccard index (AJI) in [0, 1]; 1 when both maps are empty."""
    intersection, union = aji_counts(true_ids, pred_ids)
    return intersection / union if union else 1.0


@dataclass(frozen=True)
class InstanceScores:
    """Everything one image contributes: pixel Dice counts, object matches at IoU > 0.5 and AJI sums, kept
    as counts so that images pool exactly (:meth:`pooled`)."""

    dice_tp: int
    dice_fp: int
    dice_fn: int
    objects: ObjectScores
    aji_intersection: int
    aji_union: int

    @property
    def dice(self) -> float:
        total = 2 * self.dice_tp + self.dice_fp + self.dice_fn
        return 2 * self.dice_tp / total if total else 1.0

    @property
    def aji(self) -> float:
        return self.aji_intersection / self.aji_union if self.aji_union else 1.0

    def to_dict(self) -> dict:
        o = self.objects
        return {"dice": self.dice, "f1": o.f1, "precision": o.precision, "recall": o.recall, "aji": self.aji,
                "tp": o.tp, "fp": o.fp, "fn": o.fn, "dice_counts": [self.dice_tp, self.dice_fp, self.dice_fn],
                "aji_counts": [self.aji_intersection, self.aji_union]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> InstanceScores:
        return cls(*d["dice_counts"], ObjectScores(d["tp"], d["fp"], d["fn"]), *d["aji_counts"])

    @classmethod
    def pooled(cls, scores: list[InstanceScores]) -> InstanceScores:
        """The scores of all images taken as one: summed pixel counts, object matches and AJI sums."""
        s = lambda f: int(sum(f(x) for x in scores))
        objects = ObjectScores(s(lambda x: x.objects.tp), s(lambda x: x.objects.fp), s(lambda x: x.objects.fn))
        return cls(s(lambda x: x.dice_tp), s(lambda x: x.dice_fp), s(lambda x: x.dice_fn), objects,
                   s(lambda x: x.aji_intersection), s(lambda x: x.aji_union))  # fmt: skip


def instance_scores(true_ids: np.ndarray, pred_ids: np.ndarray) -> InstanceScores:
    """Dice of the foregrounds (id > 0), object F1 at IoU > 0.5 and AJI of two instance maps."""
    t, p = np.asarray(true_ids) > 0, np.asarray(pred_ids) > 0
    overlaps = instance_overlaps(true_ids, pred_ids)
    return InstanceScores(int((t & p).sum()), int((~t & p).sum()), int((t & ~p).sum()),
                          object_scores(true_ids, pred_ids, overlaps), *aji_counts(true_ids, pred_ids, overlaps))  # fmt: skip
