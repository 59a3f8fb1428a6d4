"""Instance metrics (object F1 at IoU > 0.5, AJI, foreground Dice) on hand-made label images with known answers,
and against a dense brute-force reference on random ones."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.training.metrics import (
    InstanceScores,
    aggregated_jaccard,
    instance_overlaps,
    instance_scores,
    object_scores,
)


def boxes(shape: tuple[int, int], *placed: tuple[int, int, int, int, int]) -> np.ndarray:
    """A label image with rectangles (id, y0, x0, y1, x1)."""
    out = np.zeros(shape, np.int32)
    for k, y0, x0, y1, x1 in placed:
        out[y0:y1, x0:x1] = k
    return out


TWO = boxes((10, 12), (1, 1, 1, 5, 5), (2, 1, 6, 5, 10))  # two 4x4 nuclei one pixel apart


def test_perfect_match_in_any_numbering():
    s = instance_scores(TWO, np.where(TWO == 1, 70000, np.where(TWO == 2, 3, 0)))
    assert (s.dice, s.objects.f1, s.aji) == (1.0, 1.0, 1.0)
    assert (s.objects.tp, s.objects.fp, s.objects.fn) == (2, 0, 0)


def test_merged_pair():
    merged = boxes((10, 12), (1, 1, 1, 5, 10))  # one 4x9 object over both and the gap
    s = instance_scores(TWO, merged)
    assert (s.objects.tp, s.objects.fp, s.objects.fn) == (0, 1, 2)  # IoU 16/36 each
    assert s.objects.f1 == 0.0
    assert s.aji == pytest.approx(32 / 72)  # both pair with it: its union counted twice
    assert s.dice == pytest.approx(64 / 68)


def test_split_object():
    truth = boxes((6, 10), (1, 1, 1, 5, 9))  # 4x8
    halves = boxes((6, 10), (1, 1, 1, 5, 5), (2, 1, 5, 5, 9))  # IoU exactly 0.5 each: no match
    s = instance_scores(truth, halves)
    assert (s.objects.tp, s.objects.fp, s.objects.fn) == (0, 2, 1)
    assert s.aji == pytest.approx(16 / 48)  # paired with the lower id; the other half only adds to the union
    assert s.dice == 1.0
    uneven = boxes((6, 10), (1, 1, 1, 5, 6), (2, 1, 6, 5, 9))  # 20 + 12 px: the larger matches (IoU 0.625)
    s = instance_scores(truth, uneven)
    assert (s.objects.tp, s.objects.fp, s.objects.fn) == (1, 1, 0)
    assert s.objects.f1 == pytest.approx(2 / 3)
    assert s.aji == pytest.approx(20 / 44)


def test_missing_and_extra_objects():
    one = np.where(TWO == 1, 1, 0)
    missing = instance_scores(TWO, one)
    assert (missing.objects.tp, missing.objects.fp, missing.objects.fn) == (1, 0, 1)
    assert missing.objects.recall == 0.5 and missing.objects.precision == 1.0
    assert missing.aji == pytest.approx(0.5)
    extra = one + boxes((10, 12), (5, 6, 0, 9, 3))  # a 3x3 false object
    s = instance_scores(one, extra)
    assert (s.objects.tp, s.objects.fp, s.objects.fn) == (1, 1, 0)
    assert s.objects.f1 == pytest.approx(2 / 3)
    assert s.aji == pytest.approx(16 / 25)


def test_empty_images_and_errors():
    empty = np.zeros((4, 4), np.int32)
    s = instance_scores(empty, empty)
    assert (s.dice, s.objects.f1, s.aji) == (1.0, 1.0, 1.0)
    assert instance_scores(TWO, np.zeros_like(TWO)).aji == 0.0
    assert object_scores(np.zeros_like(TWO), TWO).precision == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        instance_overlaps(TWO, TWO[:5])
    with pytest.raises(ValueError, match="non-negative"):
        instance_overlaps(TWO, -TWO)


def test_pooled_scores_sum_counts():
    a, b = instance_scores(TWO, TWO), instance_scores(TWO, np.zeros_like(TWO))
    pooled = InstanceScores.pooled([a, b])
    assert pooled.objects.tp == 2 and pooled.objects.fn == 2
    assert pooled.aji == pytest.approx(32 / 64)
    assert InstanceScores.from_dict(pooled.to_dict()) == pooled


def dense_reference(truth: np.ndarray, pred: np.ndarray) -> tuple[int, float]:
    """TP at IoU > 0.5 and AJI from full masks, object by object (Kumar et al.'s description, literally)."""
    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    iou = np.zeros((len(t_ids), len(p_ids)))
    inter = np.zeros_like(iou)
    union = np.zeros_like(iou)
    for i, t in enumerate(t_ids):
        for j, p in enumerate(p_ids):
            inter[i, j] = ((truth == t) & (pred == p)).sum()
            union[i, j] = ((truth == t) | (pred == p)).sum()
            iou[i, j] = inter[i, j] / union[i, j]
    c = u = 0.0
    used = set()
    for i, t in enumerate(t_ids):
        if len(p_ids) and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))  # first maximum: the lowest id
            c, u = c + inter[i, j], u + union[i, j]
            used.add(j)
        else:
            u += (truth == t).sum()
    u += sum((pred == p).sum() for j, p in enumerate(p_ids) if j not in used)
    return int((iou > 0.5).sum()), (c / u if u else 1.0)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_table_equals_dense_reference(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)

    def blobs(count: int) -> np.ndarray:
        out = np.zeros((40, 40), np.int32)
        for k in rng.permutation(np.arange(1, count + 1)) * 97:  # unordered, sparse ids
            y, x, r = rng.integers(0, 40), rng.integers(0, 40), rng.integers(2, 7)
            yy, xx = np.ogrid[:40, :40]
            out[((yy - y) ** 2 + (xx - x) ** 2 <= r * r)] = k
        return out

    truth = blobs(8)
    pred = ndimage.shift(truth, (rng.integers(-2, 3), rng.integers(-2, 3)), order=0) + blobs(3) * (truth == 0)
    tp, aji = dense_reference(truth, pred)
    assert object_scores(truth, pred).tp == tp
    assert aggregated_jaccard(truth, pred) == pytest.approx(aji)
