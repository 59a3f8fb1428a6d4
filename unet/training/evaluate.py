"""Validation: predict held-out regions with the inference tiling, and accumulate metrics.

``predict_region`` cuts tiles exactly as ``pipeline.segment_slide`` does (``tile_grid_for_model``, windows
read with ``read_window``, mirrored only outside the *image*), so a held-out region of a slide sees its real
surrounding tissue and a whole held-out image is segmented as inference would segment it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.geometry import tile_grid_for_model
from pipeline.slide import read_window
from unet.training.files import to_classes
from unet.training.metrics import MetricTotals


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
    """Float32 logits (K, h, w) for ``box`` of ``image``, tiled with the inference geometry."""
    y0, x0, height, width = box
    tile_size = max(model.alignment, tile_size // model.alignment * model.alignment)
    grid = tile_grid_for_model(model, (height, width), tile_size)
    device = torch.device(device)
    out = np.zeros((model.num_classes, height, width), dtype=np.float32)
    tiles = list(grid)
    for start in range(0, len(tiles), batch_size):
        batch = tiles[start : start + batch_size]
        windows = []
        for tile in batch:
            wy, wx = grid.input_origin(tile)
            window = read_window(image, y0 + wy, x0 + wx, grid.input_size)
            windows.append(window[..., None] if window.ndim == 2 else window)
        x = torch.from_numpy(np.stack(windows)).permute(0, 3, 1, 2).to(device=device, dtype=torch.float32) / 255.0
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float().cpu().numpy()
        for k, tile in enumerate(batch):
            c = grid.crop
            out[:, tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = logits[
                k, :, c : c + tile.height, c : c + tile.width
            ]
    return out


def evaluate(
    model: torch.nn.Module,
    items: list[ValItem],
    label_mode: str,
    tile_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
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
            truth = to_classes(raw, label_mode, model.num_classes)
            pred = logits.argmax(0)
            totals.add(truth, pred, raw.astype(np.int64) if label_mode == "instances" else None)
            loss = F.cross_entropy(torch.from_numpy(logits)[None], torch.from_numpy(truth)[None], reduction="sum")
            totals.loss_sum += float(loss)
            totals.loss_pixels += int(truth.size)
    finally:
        model.train(was_training)
    return totals
