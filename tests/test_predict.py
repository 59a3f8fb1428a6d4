"""The fused tile step: float32 on CPU is the reference; autocast and torch.compile (padded static batch) agree."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_image, shared_file, varied_unet
from pipeline import open_slide, tile_grid_for_model
from pipeline.inference.tile_batches import read_windows
from pipeline.inference.predict import (
    COMPILE_MIN_TILES, TilePredictor, cpu_has_native_bf16, resolve_amp, resolve_compile, resolve_device,
    whole_image_logits, windows_per_batch,
)


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


def test_a_window_of_2x2_tiles_gives_each_tile_its_own_output_eager_and_compiled(batch):
    """One forward window over a block of 2 x 2 tiles (side 128 + the reach) returns the block's 128^2 labels:
    each quarter is that tile's output alone; compiled, the block is one static batch of its own (1 window for
    every 4 tiles of the batch size)."""
    model, grid, _, _ = batch
    image = open_slide(random_image(200, 200, seed=7))
    tiles = [grid.tile(r, c) for r in (0, 1) for c in (0, 1)]
    alone = TilePredictor.for_grid(model, grid, device="cpu")(read_windows(image, grid, tiles), return_logits=True)
    block = image.read_window(-grid.halo, -grid.halo, 2 * grid.tile_size + grid.reach)[None]
    assert windows_per_batch(4, 64, 128) == 1 and windows_per_batch(16, 64, 128) == 4 and windows_per_batch(4, 64, 64) == 4
    for compile in (False, True):
        predictor = TilePredictor.for_grid(model, grid, device="cpu", compile=compile, batch_size=4)
        out = predictor(block, return_logits=True)
        assert out["labels"].shape == (1, 128, 128)
        for k, tile in enumerate(tiles):
            quarter = np.s_[tile.y : tile.y + 64, tile.x : tile.x + 64]
            assert np.abs(out["logits"][0][(slice(None), *quarter)] - alone["logits"][k]).max() <= 1e-4
            assert (out["labels"][0][quarter] == alone["labels"][k]).mean() > 0.999  # ties at float rounding only


def test_compile_auto_compiles_cpu_work_of_enough_tiles_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu, COMPILE_MIN_TILES) is True and resolve_compile("auto", cpu, COMPILE_MIN_TILES - 1) is False
    assert resolve_compile("auto", cuda, 10**6) is False  # not measured on a GPU yet: eager there
    assert resolve_compile(True, cpu, 1) is True and resolve_compile("max-autotune", cpu, 1) == "max-autotune"


def test_an_actor_compiles_once_its_slide_or_its_run_reaches_the_threshold(batch, monkeypatch, tmp_path):
    """``--compile auto`` in a Ray actor: eager for small slides, compiled from the call where this slide, or all the
    actor has run, reaches COMPILE_MIN_TILES; each predictor compiles once (torch.compile recorded, not run)."""
    from pipeline.inference import predict, tile_batches
    from pipeline.inference.engine import plan_slide
    from pipeline.inference.ray_runner import without_shards

    model, grid, windows, reference = batch
    compiled = []
    monkeypatch.setattr(predict, "COMPILE_MIN_TILES", 6)
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(options) or fn)
    actor = tile_batches.ShardActor(model, 64, "cpu", None, False, "auto", 4, 0)  # 0: leave torch's threads alone
    small = type("Plan", (), {"tiles_to_run": 4})()
    shard = grid.shard(0, 0)  # shard_tiles 1: one tile
    for _ in range(6):
        actor._before(small, shard)
    assert not compiled and actor.predictor.compile is False
    actor._before(small, shard)  # the 7th tile: the actor has run 6
    assert compiled == [{"mode": None, "options": {"freezing": True}, "dynamic": False}]
    big = tile_batches.ShardActor(model, 64, "cpu", None, False, "auto", 4, 0)
    plan = plan_slide(random_image(200, 200), tmp_path / "big.zarr", model, tile_size=64, shard_tiles=2)
    assert plan.tiles_to_run == 16 and without_shards(plan).tiles_to_run == 16  # what a Ray actor's copy says
    big._before(without_shards(plan), plan.shards[0])
    assert len(compiled) == 2 and big.predictor.compile is True
    assert np.abs(big.predictor(windows, return_logits=True)["logits"] - reference["logits"]).max() <= 1e-4


def test_a_compile_that_fails_goes_on_eagerly_when_asked_to(batch, monkeypatch, caplog):
    """No C++ compiler on a user's machine must not fail a ``--compile auto`` run: one warning, eager results;
    an explicit compile still raises."""
    model, grid, windows, reference = batch

    def broken(*_):
        raise RuntimeError("InductorError: no C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda fn, **options: broken)
    predictor = TilePredictor.for_grid(model, grid, device="cpu", batch_size=4)
    predictor.start_compiling(True, eager_if_it_fails=True)
    out = predictor(windows, return_logits=True)
    assert np.array_equal(out["labels"], reference["labels"]) and predictor.compile is False
    assert "torch.compile failed, running eagerly" in caplog.text and "no C++ compiler" in caplog.text
    strict = TilePredictor.for_grid(model, grid, device="cpu", batch_size=4, compile=True)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        strict(windows)


def test_amp_and_device_choices():
    import torch

    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) is (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert resolve_amp("off", cpu) is None and resolve_amp(None, cpu) is None
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("fp16", cpu) is torch.float16
    assert resolve_amp("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be one of"):
        resolve_amp("int8", cpu)
    assert resolve_device("cpu") == cpu


def test_channels_last_gives_the_float32_logits_of_nchw(batch):
    model, grid, windows, reference = batch
    nchw = TilePredictor.for_grid(model, grid, device="cpu", channels_last=False)(windows, return_logits=True)
    assert TilePredictor.for_grid(model, grid, device="cpu").channels_last  # the default layout
    assert (nchw["labels"] == reference["labels"]).all()
    assert np.abs(nchw["logits"] - reference["logits"]).max() <= 1e-5


@pytest.mark.parametrize("amp", [None, "bf16"])
def test_tiles_agree_with_one_whole_pass_in_the_same_precision_on_a_real_slide(amp):
    """float32 is the exact mode (logits within float rounding); bf16 rounds each layer, so a pixel's value
    depends a little on its tile and near-ties may flip: on real tissue, all but a few in ten thousand."""
    from pipeline.inference.tile_batches import tiled_region_logits
    from pipeline.slides.sources import ArraySource
    from unet import load_model

    REPO = Path(__file__).resolve().parents[1]

    model = load_model(REPO / "models" / "nuclei-unet.pt")
    region = open_slide(shared_file("slides/cmu-1-small-region.svs")).read(1000, 1600, 700, 1300)
    grid = tile_grid_for_model(model, region.shape[:2], 256)
    predictor = TilePredictor.for_grid(model, grid, device="cpu", amp=amp)
    tiled = tiled_region_logits(ArraySource(region), grid, predictor)
    whole = whole_image_logits(model, region, amp=amp)
    agreement = (tiled.argmax(0) == whole.argmax(0)).mean()
    if amp is None:
        assert agreement == 1.0 and np.abs(tiled - whole).max() <= 1e-3
    else:
        assert agreement >= 0.999, agreement
