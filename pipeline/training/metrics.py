"""Segmentation metrics: pixel error, foreground Dice/F1, and the ISBI 2012 Rand error.

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
            [self.pixels, self.wrong, self.tp, self.fp, self.fn, self.rand_sum, self.images, self.loss_sum, self.loss_pixels],
            dtype=np.float64,
        )

    @classmethod
    def from_vector(cls, vector: np.ndarray) -> "MetricTotals":
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
