"""Shared fixtures: the ../shared data (skip when absent), small varied-output U-Nets, one local Ray."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from unet import UNet

SHARED = Path(os.environ.get("WSI_TEST_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_file(relative: str) -> Path:
    """A file under ../shared/data, or skip the test with the reason."""
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"test data {path} not found (needs ../shared beside the checkout, or WSI_TEST_DATA)")
    return path


def varied_unet(seed: int = 0, num_classes: int = 3, **config) -> UNet:
    """A Kaiming-initialised U-Net whose argmax really varies over an image.

    Random nets put almost every pixel in one class because the logits share a large offset; setting
    the output bias to minus the mean logit per class (measured on a random image) removes it.
    """
    torch.manual_seed(seed)
    config = {"base_channels": 4, "depth": 3, **config}
    model = UNet(num_classes=num_classes, **config).eval()
    size = model.input_size_for(model.valid_output_size(64)) if model.is_valid_padding else 64
    image = torch.rand(1, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        mean = model(image).mean(dim=(0, 2, 3))
        model.outc.bias -= mean
    return model


@pytest.fixture
def model() -> UNet:
    return varied_unet()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance on loopback for the whole session, shut down at the end."""
    pytest.importorskip("ray")
    from pipeline.ray_setup import init_ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach a test to someone's cluster
    ray = init_ray(
        num_cpus=2, log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}},
    )  # fmt: skip
    yield ray
    ray.shutdown()


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth-ish random uint8 image (noise plus gradients) so outputs vary at several scales."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(yy / 7.0)[..., None] * np.cos(xx / 11.0)[..., None]
    return np.clip(base + rng.normal(0, 40, (height, width, channels)), 0, 255).astype(np.uint8)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store, by relative path, with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def assert_identical_stores(actual: Path, expected: Path) -> None:
    """Same files with the same bytes: what "a resumed or retried run equals an uninterrupted one" means."""
    got, want = store_files(actual), store_files(expected)
    assert sorted(got) == sorted(want), f"different files: {sorted(set(got) ^ set(want))[:10]}"
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files with other bytes: {differ[:10]}"


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch with ``count`` intra-op threads (an actor with ``cpus_per_actor=count`` does the same)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def tile_states_written(store: Path) -> int:
    """Tiles recorded done or skipped so far: one ``tiles/state`` chunk file each (read while a run writes)."""
    folder = Path(store) / "tiles" / "state" / "c"
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0
