"""Installed like a tool: console entry points, and the bundled model found without the repository."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from jobs import bundled_file

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("wsi-segment", "wsi-summarize", "wsi-train")


def test_the_bundled_model_is_found_in_the_checkout_then_in_the_installed_copy(tmp_path):
    checkout, installed = tmp_path / "repo" / "models", tmp_path / "share" / "wsi-unet" / "models"
    installed.mkdir(parents=True)
    (installed / "nuclei-unet.pt").write_bytes(b"installed")
    assert bundled_file("nuclei-unet.pt", (checkout, installed)) == installed / "nuclei-unet.pt"
    checkout.mkdir(parents=True)
    (checkout / "nuclei-unet.pt").write_bytes(b"checkout")
    assert bundled_file("nuclei-unet.pt", (checkout, installed)) == checkout / "nuclei-unet.pt"
    assert bundled_file("missing.pt", (checkout, installed)) == checkout / "missing.pt"  # named in the error
    assert bundled_file("nuclei-unet.pt") == REPO / "models" / "nuclei-unet.pt"


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_entry_points_run(script):
    path = Path(sys.prefix) / "bin" / script
    assert path.is_file(), f"{path}: missing; reinstall the project (pip install -e '.[dev]') to create it"
    out = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout


@pytest.mark.slow
def test_the_wheel_ships_the_entry_points_and_the_bundled_model(tmp_path):
    import shutil

    source = tmp_path / "src"  # a copy: building writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    for name in ("unet", "pipeline", "jobs", "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = tmp_path.glob("wsi_unet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"jobs/segment_slides.py", "jobs/__init__.py", "pipeline/__init__.py", "unet/__init__.py"} <= set(names)
    data = [n for n in names if n.endswith("share/wsi-unet/models/nuclei-unet.pt")]
    assert data and ".data/data/" in data[0]  # installed to <prefix>/share/wsi-unet/models
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for script, target in zip(SCRIPTS, ("jobs.segment_slides:run", "jobs.summarize_results:run", "jobs.train_unet:run")):
        assert f"{script} = {target}" in entry_points
