"""Validation: predict held-out regions with the inference tiling, and accumulate metrics.

``predict_region`` cuts and predicts tiles exactly as ``pipeline.segment_slide`` does (``tile_grid_for_model``,
the inference tile-batch path and predictor, windows mirrored only outside the *image*), so a held-out region of a slide sees its real
surrounding tissue and a whole held-out image is segmented as inference would segment it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.inference.predict import TilePredictor
from pipeline.inference.tile_batches import tiled_region_logits
from pipeline.slides.geometry import tile_grid_for_model
from pipeline.training.files import Rim, to_classes
from pipeline.training.metrics import MetricTotals


@dataclass
class ValItem:
    """A held-out region ``box`` = (y0, x0, height, width) of ``image`` (H, W, C) with raw labels ``label``."""

    name: str
    image: Any
    label: Any
    box: tuple[int, int, int, int]


def predict_region(
    model: torch.nn.Module,
    image: Any,
    box: tuple[int, int, int, int],
    tile_size: int = 256,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> np.ndarray:
    """Float32 logits (K, h, w) for ``box`` of ``image``: the inference geometry and the inference predictor
    (:class:`~pipeline.inference.predict.TilePredictor`, the same uint8 -> normalise -> autocast -> crop step)."""
    y0, x0, height, width = box
    tile_size = max(model.alignment, tile_size // model.alignment * model.alignment)
    grid = tile_grid_for_model(model, (height, width), tile_size)
    amp = {None: None, torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
    benchmark = torch.backends.cudnn.benchmark  # the predictor turns cuDNN autotuning on; training keeps its own
    try:
        predictor = TilePredictor.for_grid(model, grid, device=device, amp=amp, channels_last=channels_last)
        return tiled_region_logits(image, grid, predictor, origin=(y0, x0), batch_size=batch_size)
    finally:
        torch.backends.cudnn.benchmark = benchmark


def evaluate(
    model: torch.nn.Module,
    items: list[ValItem],
    label_mode: str,
    tile_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    rim: Rim = Rim(),
) -> MetricTotals:
    """Metric sums over ``items`` (pixel error, Dice, Rand error and unweighted cross-entropy)."""
    totals = MetricTotals()
    was_training = model.training
    model.eval()
    try:
        for item in items:
            logits = predict_region(model, item.image, item.box, tile_size, 4, device, amp_dtype, channels_last)
            y0, x0, h, w = item.box
            raw = np.asarray(item.label[y0 : y0 + h, x0 : x0 + w])
            truth = to_classes(raw, label_mode, model.num_classes, rim)
            pred = logits.argmax(0)
            totals.add(truth, pred, raw.astype(np.int64) if label_mode == "instances" else None)
            loss = F.cross_entropy(torch.from_numpy(logits)[None], torch.from_numpy(truth)[None], reduction="sum")
            totals.loss_sum += float(loss)
            totals.loss_pixels += int(truth.size)
    finally:
        model.train(was_training)
    return totals
