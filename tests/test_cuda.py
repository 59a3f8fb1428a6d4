"""On a CUDA device: the fused step agrees with float32 on the CPU, float32 tiles equal one whole pass, and the
in-process engine segments a real slide end to end. Skipped without CUDA (``pytest -m cuda`` selects them;
``benchmarks/device_check.sh`` runs them on a GPU machine)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file
from pipeline import open_slide, tile_grid_for_model
from pipeline.inference.predict import TilePredictor, whole_image_logits
from pipeline.inference.tile_batches import read_windows, tiled_region_logits
from pipeline.slides.sources import ArraySource

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundled():
    from unet import load_model

    return load_model(REPO / "models" / "nuclei-unet.pt")


@pytest.fixture(scope="module")
def cmu_region():
    return open_slide(shared_file("slides/cmu-1-small-region.svs")).read(900, 1924, 500, 1524)


def _labels_and_logits(model, grid, windows, **options):
    out = TilePredictor.for_grid(model, grid, **options)(windows, return_logits=True)
    return out["labels"], out["logits"]


def test_fused_bf16_step_on_cuda_agrees_with_float32_on_the_cpu(bundled, cmu_region):
    grid = tile_grid_for_model(bundled, cmu_region.shape[:2], 256)
    windows = read_windows(ArraySource(cmu_region), grid, list(grid))
    cpu_labels, _ = _labels_and_logits(bundled, grid, windows, device="cpu")
    cuda_labels, _ = _labels_and_logits(bundled, grid, windows, device="cuda", amp="bf16")
    assert (cuda_labels == cpu_labels).mean() >= 0.999


def test_float32_on_cuda_equals_float32_on_the_cpu(bundled, cmu_region):
    grid = tile_grid_for_model(bundled, cmu_region.shape[:2], 256)
    windows = read_windows(ArraySource(cmu_region), grid, list(grid)[:4])
    cpu_labels, cpu_logits = _labels_and_logits(bundled, grid, windows, device="cpu")
    cuda_labels, cuda_logits = _labels_and_logits(bundled, grid, windows, device="cuda")  # TF32 off
    assert np.abs(cuda_logits - cpu_logits).max() <= 1e-3
    assert (cuda_labels == cpu_labels).mean() >= 0.99999


def test_float32_tiles_on_cuda_equal_one_whole_pass(bundled, cmu_region):
    grid = tile_grid_for_model(bundled, cmu_region.shape[:2], 256)
    predictor = TilePredictor.for_grid(bundled, grid, device="cuda")
    tiled = tiled_region_logits(ArraySource(cmu_region), grid, predictor)
    whole = whole_image_logits(bundled.to("cuda"), cmu_region)
    bundled.to("cpu")
    assert np.abs(tiled - whole).max() <= 1e-3
    assert (tiled.argmax(0) == whole.argmax(0)).mean() >= 0.99999


def test_in_process_engine_segments_a_real_slide_on_cuda(bundled, tmp_path):
    from pipeline import segment_slide
    from pipeline.store.output_store import open_labels

    slide = shared_file("slides/cmu-1-small-region.svs")
    on_gpu = segment_slide(slide, tmp_path / "gpu.zarr", bundled, tile_size=256, device="cuda", amp="bf16")
    on_cpu = segment_slide(slide, tmp_path / "cpu.zarr", bundled, tile_size=256, device="cpu")
    assert on_gpu.error is None and on_gpu.tiles_run == on_cpu.tiles_run > 0
    agreement = (open_labels(on_gpu.output)[...] == open_labels(on_cpu.output)[...]).mean()
    assert agreement >= 0.999
