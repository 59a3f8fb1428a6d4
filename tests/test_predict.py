"""The fused tile step: float32 on CPU is the reference; autocast and torch.compile (padded static batch) agree."""

import numpy as np
import pytest

from conftest import random_image, varied_unet
from pipeline import open_slide, tile_grid_for_model
from pipeline.inference.tile_batches import read_windows
from pipeline.inference.predict import TilePredictor, resolve_amp, resolve_device


@pytest.fixture(scope="module")
def batch():
    model = varied_unet()
    grid = tile_grid_for_model(model, (200, 200), 64)
    windows = read_windows(open_slide(random_image(200, 200)), grid, list(grid)[:3])
    reference = TilePredictor.for_grid(model, grid, device="cpu", probabilities=True)(windows, return_logits=True)
    return model, grid, windows, reference


def test_outputs_are_uint8_tiles_cropped_to_the_tile_size(batch):
    _, _, windows, reference = batch
    assert windows.dtype == np.uint8 and windows.shape == (3, 156, 156, 3)  # valid output 68 >= 64, + 2 * halo 44
    assert reference["labels"].shape == (3, 64, 64) and reference["labels"].dtype == np.uint8
    assert reference["probabilities"].shape == (3, 3, 64, 64) and reference["probabilities"].dtype == np.uint8
    assert (reference["logits"].argmax(1) == reference["labels"]).all()


def test_bf16_autocast_on_cpu_agrees_with_float32(batch):
    model, grid, windows, reference = batch
    bf16 = TilePredictor.for_grid(model, grid, device="cpu", amp="bf16")(windows, return_logits=True)
    assert (bf16["labels"] == reference["labels"]).mean() > 0.97
    assert np.abs(bf16["logits"] - reference["logits"]).max() < 0.1


def test_compiled_step_pads_a_short_batch_and_matches_eager(batch):
    model, grid, windows, reference = batch
    compiled = TilePredictor.for_grid(model, grid, device="cpu", compile=True, batch_size=4)
    out = compiled(windows, return_logits=True)  # 3 tiles, padded to the static batch of 4
    assert out["labels"].shape == (3, 64, 64)
    assert np.abs(out["logits"] - reference["logits"]).max() <= 1e-4


def test_amp_and_device_choices():
    import torch

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("int8", cpu)
    assert resolve_device("cpu") == cpu
