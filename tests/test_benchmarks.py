"""Smoke tests of benchmarks/ on tiny inputs, so `python benchmarks/run.py` cannot rot.

No timing is asserted: only that every section's code runs and gives well-formed tables and JSON, that
the efficiency is a positive finite number, and that the distances of the peer comparison are sane.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file, varied_unet

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import common, durability, efficiency, gpu, peer, reads, slides  # noqa: E402


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory) -> Path:
    from pipeline.demo.synthetic import make_demo_slide

    path = tmp_path_factory.mktemp("bench") / "tiny.tiff"
    make_demo_slide(path, height=384, width=384, seed=1, tissue=slides.TISSUE)
    return path


@pytest.fixture(scope="module")
def tiny_model():
    return varied_unet(7, num_classes=2, base_channels=2, depth=2)


def test_table_and_json(tmp_path):
    table = common.markdown_table(["a", "b"], [["x", 1.23456], ["y", None]])
    lines = table.splitlines()
    assert lines[0] == "| a | b |" and lines[1] == "| --- | --- |" and lines[2] == "| x | 1.235 |" and "-" in lines[3]
    path = common.write_json({"machine": common.machine(), "sections": {}}, tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert data["machine"]["cpu_count"] >= 1 and "load_average" in data["machine"]


def test_isolated_bare_forward_runs_niced(tiny_slide, tiny_model):
    grid, windows = efficiency.pre_read_windows(tiny_slide, tiny_model, 128, 2, batches=1)
    result = efficiency.isolated_bare_forward(5, tiny_model, grid, windows, 1, 0.05)
    assert result["mpx_per_s"] > 0 and result["steps"] >= 3


def test_tree_memory_counts_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(50 << 20); time.sleep(3)"])
    try:
        time.sleep(1.0)
        with common.TreeMemory(interval=0.05) as memory:
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert memory.peak_processes >= 2 and memory.peak_pss > 50 << 20 and memory.peak_rss >= memory.peak_pss


@pytest.mark.slow
def test_efficiency_on_a_tiny_slide(ray_local, tiny_slide, tiny_model, tmp_path):
    from pipeline.inference.ray_runner import RayOptions

    options = RayOptions(actors=1, batch_size=2, progress=False)
    record = efficiency.measure(tiny_slide, tiny_model, tmp_path, label="default", options=options, num_cpus=None,
                                tile_size=128, forward_seconds=0.2, isolate=False)  # fmt: skip
    assert math.isfinite(record["efficiency"]) and record["efficiency"] > 0
    assert record["pipeline"]["tiles_run"] == 9 and record["pipeline"]["memory"]["peak_pss_mib"] > 0
    assert 0 < record["pipeline"]["model_busy"] < 1  # timed in the actor, a share of the end-to-end time
    row = efficiency.row(record)
    assert len(row) == len(efficiency.COLUMNS)
    assert common.markdown_table(efficiency.COLUMNS, [row]).count("\n") == 2


def test_peer_comparison_distances(tiny_model, tmp_path):
    pytest.importorskip("monai", reason='MONAI is not installed (pip install -e ".[bench]")')
    from pipeline.inference.engine import tiled_logits
    from unet import save_model

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    assert np.array_equal(peer.symmetric_pad(x, 5)[0].permute(1, 2, 0).numpy(),
                          np.pad(image, ((5, 5), (5, 5), (0, 0)), mode="symmetric"))  # fmt: skip
    path = save_model(tiny_model, tmp_path / "m.pt", class_names=["bg", "fg"])
    reference = peer.run_reference(image, str(path), 1)["probabilities"]
    assert reference.shape == (2, 80, 72) and np.allclose(reference.sum(axis=0), 1, atol=1e-5)
    ours = peer._softmax(tiled_logits(image, tiny_model, 16))
    differs, delta = peer.distance(reference, ours)
    assert differs == 0 and delta < 1e-4  # exact tiling: the same as one pass over the whole image
    monai = peer.run_monai(image, str(path), 1, 16, 2, 0.5, "gaussian")
    assert monai["probabilities"].shape == reference.shape and monai["passes"] > 1
    differs, delta = peer.distance(reference, monai["probabilities"])
    assert 0 <= differs <= 1 and 0 <= delta <= 1
    roi = peer.roi_size(tiny_model, 16)
    out = peer.MirrorPaddedUNet(tiny_model)(torch.zeros(1, 3, roi, roi))
    assert out.shape[-2:] == (roi, roi)


def test_gpu_section_pieces_on_cpu():
    model = gpu.paper_unet()
    (row,) = gpu.flop_table(model, [388])
    assert row[0] == "572 -> 388" and 1.9 < row[2] < 2.1  # ~2.0 MFLOP per output pixel (design notes)
    small = varied_unet(1, num_classes=2, base_channels=2, depth=2)
    rows = gpu.sweep(small, [16], [1, 2], 0.05, 1.0, device="cpu")
    assert len(rows) == 2 and all(len(r) == len(gpu.SWEEP_COLUMNS) and r[4] > 0 for r in rows)
    if not torch.cuda.is_available():
        section = gpu.run(Path("."), tiles=[388], batches=[1], peak_tflops=790.0, slide_gpx=0.01, mosaic_base=512,
                          quick=True)  # fmt: skip
        assert "skipped" in section and "CUDA" in section["skipped"] and len(section["rows"]) == 1


def test_mosaic_slide_repeats_the_rendered_tiles(tmp_path):
    import openslide

    path = slides.mosaic_slide(tmp_path, 512, 2)
    handle = openslide.OpenSlide(str(path))
    assert handle.level_dimensions[0] == (1024, 1024) and handle.properties["openslide.mpp-x"] == "0.5"
    a = np.asarray(handle.read_region((600, 530), 0, (64, 64)))
    b = np.asarray(handle.read_region((88, 18), 0, (64, 64)))
    assert np.array_equal(a, b)
    assert slides.slide_side(0.1) % 2048 == 0 and abs(slides.slide_side(1.0) ** 2 / 1e9 - 1) < 0.1


def test_run_command_writes_json(tmp_path, capsys):
    from benchmarks import run

    if torch.cuda.is_available():
        pytest.skip("on CUDA the GPU section runs in full (minutes); this smoke test is for CPU machines")

    results = run.main(["--quick", "--sections", "gpu", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert "(e) GPU" in out and "MFLOP per output px" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["sections"]) == {"gpu"} and data["sections"]["gpu"]["rows"] == results["sections"]["gpu"]["rows"]


@pytest.mark.slow
def test_reads_section_times_every_reader_and_sees_the_old_one_is_not_exact(tmp_path):
    """Level 1 of a 2047 px slide is 1024 px (downsample 1.999): OpenSlide regions shift, native tiles do not."""
    section = reads.run(tmp_path, side=2048, tile_size=128, halo=44, limit=12)
    assert len(section["rows"]) == 2 * len(reads.READERS)
    exact = {(row[0], row[2]): row[8] for row in section["rows"]}
    assert exact[(1, reads.READERS[0])] == "no" and exact[(1, reads.READERS[1])] == "yes"
    assert all(row[4] > 0 for row in section["rows"])
    common.markdown_table(section["columns"], section["rows"])


def test_durability_section_counts_the_fsyncs_it_times(tmp_path):
    """The job's writes sync files and folders (the no-op pass makes the same calls, which do nothing)."""
    section = durability.run(tmp_path, side=512, tile_size=128, repeats=1, shard_tiles=2)
    rows = {(row[0], row[1]): row for row in section["rows"]}
    assert rows[("write shard", "on (the job)")][2] == 4  # 2 x 2 shards
    assert rows[("write shard", "on (the job)")][4] >= 4  # the shard and its folder, then its mark and its folder
    assert rows[("write shard", "off (no-op)")][4] == rows[("write shard", "on (the job)")][4]
    assert rows[("create store", "on (the job)")][4] > 5 and rows[("finalize", "on (the job)")][4] > 1
    common.markdown_table(section["columns"], section["rows"])


def test_cohort_big_slide_times_planning_and_the_end_and_counts_the_files(tmp_path, tiny_slide):
    from benchmarks import cohort

    model = slides.small_model(tmp_path)
    big = cohort.big_slide(tmp_path, tiny_slide, model, tile_size=64)
    assert big["shards_written"] >= 1 and big["planning_s"] >= 0 and big["after_last_tile_s"] >= 0
    stored = sum(1 for p in (tmp_path / "big-slide.zarr").rglob("*") if p.is_file())
    assert big["files"] == stored and big["files_before"] > big["files"]  # a file per tile before, per shard now
    assert cohort.files_before_shards((512, 512), 256, run=3, skipped=1) == 4 + 3 + 1 + 12  # level 1: one chunk


@pytest.mark.slow
def test_device_check_dry_run_exercises_every_step_but_the_cuda_ones(tmp_path):
    """benchmarks/device_check.sh --dry-run: environment, imports, the CUDA tests (skipped here), the GPU section
    at toy sizes on the CPU, including segment_slide end to end on a synthetic and a real slide."""
    import os

    shared_file("slides/cmu-1-small-region.svs")  # skips without ../shared
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path)}, timeout=600)  # fmt: skip
    steps = (tmp_path / "steps.log").read_text()
    assert done.returncode == 0 and "imports: ok" in steps, steps
    assert "end cuda-tests rc=0" in steps and "end gpu rc=0" in steps, steps
    gpu = json.loads((tmp_path / "gpu.json").read_text())["sections"]["gpu"]
    runs = {row[0]: row for row in dict((t[0], t[2]) for t in gpu["tables"])["end to end (in-process engine)"]}
    assert set(runs) == {"paper U-Net, synthetic", "bundled model, cmu-1-small-region.svs"}
    assert all(row[2] > 0 and row[5] > 0 for row in runs.values())  # tiles run, end-to-end Mpx/s


def test_instances_section_times_the_labelling_against_one_read(tmp_path):
    from benchmarks import instances

    section = instances.run(tmp_path, gigapixels=0.001, workers=1)
    assert [row[3] for row in section["rows"]] == ["read once", "instances (2 passes)"]
    assert section["rows"][1][-1] == section["instances"] > 100 and all(row[6] > 0 for row in section["rows"])  # Mpx/s
    common.markdown_table(section["columns"], section["rows"])
