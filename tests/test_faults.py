"""The job under faults: kill -9 of the job then the same command again, a killed actor and a removed node on a
multi-node cluster, a full or read-only disk, two jobs on one output, and a batch of bad inputs.

Each case ends with stores identical to an uninterrupted run, or with one line per bad input naming the file,
a non-zero exit and the good slides of the batch complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    JPEG_LS_LOSSLESS, QUIET, assert_identical_stores, error_lines, kill_session, random_image, shared_file, start_job,
    tile_states_written, torch_threads, varied_unet, write_dicom_level,
)  # fmt: skip
from conftest import run_job as run_quiet_job
from pipeline.inference.report import read_run_report
from pipeline.store.shard_state import read_tile_states
from pipeline.inference.batch import BatchConfig, segment_batch, slide_items
from pipeline.inference.engine import plan_slide, segment_slide
from pipeline.store.locking import StoreLock
from pipeline.inference.ray_runner import RayOptions
from pipeline.inference.scheduler import segment_slides_ray
from pipeline.store.output_store import read_provenance
from unet import save_model

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "jobs" / "segment_slides.py"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A small 3-class model trained at 0.5 µm/px, as a file (what the job loads)."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(varied_unet(3, base_channels=8), path, class_names=["bg", "a", "b"], mpp=0.5)


def job(*args: str, **popen) -> subprocess.Popen:
    return start_job(*args, *QUIET, **popen)


def run_job(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_quiet_job(*args, *QUIET, timeout=timeout)


# --------------------------------------------------------------------------- kill -9, then the same command
@pytest.mark.slow
def test_kill_9_of_a_cohort_job_then_rerun_ends_identical(artifact, tmp_path):
    """A folder of three slides, the job killed while the first is mid-run (the others planned, running or done
    beside it), then the same command: every store equals an uninterrupted run's, byte for byte."""
    import tifffile

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    (cohort / "a-cmu.svs").symlink_to(shared_file("slides/cmu-1-small-region.svs"))
    (cohort / "b-small.svs").symlink_to(shared_file("slides/small-16px.svs"))
    tifffile.imwrite(cohort / "c-plain.tif", random_image(400, 300, seed=8), photometric="rgb")  # no µm/px: level 0
    names = ["a-cmu.zarr", "b-small.zarr", "c-plain.zarr"]
    reference = tmp_path / "reference"  # what the job writes uninterrupted: the engine, the job's precision, 1 thread
    with torch_threads(1):
        for slide, name in zip(sorted(cohort.iterdir()), names):
            segment_slide(str(slide), reference / name, artifact, tile_size=256, target_mpp=0.5, tissue_mask=True,
                          shard_tiles=2, amp="auto")  # fmt: skip
    states = read_tile_states(reference / names[0])
    skipped, segmented = int((states == 2).sum()), int((states == 1).sum())  # skipped: known at creation
    for moment, target in (("mid-run", skipped + segmented // 2), ("late", skipped + segmented * 4 // 5)):
        out = tmp_path / moment.replace(" ", "-")
        store = out / names[0]
        running = job(str(cohort), "--out", str(out), "--model", str(artifact), "--shard-tiles", "2",
                      "--threads-per-actor", "1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while running.poll() is None and tile_states_written(store) < target:
            time.sleep(0.05)
        os.kill(running.pid, signal.SIGKILL)
        running.wait()
        kill_session(running.pid)
        assert running.returncode == -signal.SIGKILL, f"{moment}: the job ended before it was killed"
        if tile_states_written(store) < skipped + segmented:
            assert read_provenance(store)["status"] == "running", moment  # never looks finished
        again = run_job(str(cohort), "--out", str(out), "--model", str(artifact), "--shard-tiles", "2",
                        "--threads-per-actor", "1")  # fmt: skip
        assert again.returncode == 0, again.stderr
        assert " earlier " in again.stdout  # the table says it resumed
        report = read_run_report(out)
        first = str(cohort / "a-cmu.svs")
        assert first in report["summary"]["resumed"] and report["summary"]["complete"] == 3
        for name in names:
            assert_identical_stores(out / name, reference / name)
        assert sorted(p.name for p in out.iterdir() if p.suffix != ".png") == [*names, "run-reports"]  # no lock, no leftovers
        assert len(list((out / "run-reports").iterdir())) == 2  # the killed run's report is kept, not overwritten


# --------------------------------------------------------------------------- worker faults, multi-node
@pytest.mark.slow
def test_killed_actor_and_removed_worker_node_still_give_identical_output(artifact, tmp_path):
    """On a 127.0.0.1 cluster of head + worker nodes: SIGKILL the model actor mid-run, then remove the node
    running the actor and add another; Ray restarts the actor and retries its shards, the idempotent shard
    writes make the retries harmless, and the store equals the in-process reference."""
    slide = shared_file("slides/cmu-1-small-region.svs")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_cluster.py"), str(slide), str(tmp_path / "ray.zarr"), str(artifact),
         "--kill-after", "12", "--remove-after", "40"],
        capture_output=True, text=True, timeout=400, env=env, start_new_session=True,
    )  # fmt: skip
    summary = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and summary, done.stdout[-2000:] + done.stderr[-3000:]
    log = json.loads(summary[0].removeprefix("RESULT "))
    assert log["killed_actor_pids"] and log["killed_at_tiles"] < log["tiles"], log
    assert log["removed_node_at_tiles"] < log["tiles"], log
    assert log["status"] == "complete" and log["tiles_run"] == log["tiles"] == 108, log
    with torch_threads(1):  # the actor ran one thread: same reduction order, same bytes
        segment_slide(slide, tmp_path / "reference.zarr", artifact, tile_size=256, shard_tiles=2)
    assert_identical_stores(tmp_path / "ray.zarr", tmp_path / "reference.zarr")


# --------------------------------------------------------------------------- disks
@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate the disk (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path) -> Path:
    """Write until the disk is full."""
    filler = folder / "filler"
    with open(filler, "wb") as handle:
        with contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    return filler


@pytest.mark.slow
def test_full_disk_fails_the_slide_in_one_line_and_a_rerun_finishes_it(ray_local, tmp_path):
    model = varied_unet(3)
    slide = shared_file("slides/cmu-1-small-region.svs")
    with tmpfs(tmp_path / "disk", "32m") as disk:
        plan = plan_slide(slide, disk / "cmu.zarr", model, tile_size=256)
        filler = fill(disk)
        (result,) = segment_slides_ray([plan], model, progress=False)
        assert result.status.startswith("failed: ") and "No space left on device" in result.status, result.status
        assert "\n" not in result.status and f"writing {disk / 'cmu.zarr'}" in result.status
        assert read_provenance(disk / "cmu.zarr")["status"] == "running"  # never marked complete
        filler.unlink()  # the user frees space and runs again
        plan = plan_slide(slide, disk / "cmu.zarr", model, tile_size=256, resume=True)
        (result,) = segment_slides_ray([plan], model, progress=False)
        assert result.status == "complete" and result.tiles_done_earlier + result.tiles_run == 108
        shutil.copytree(disk / "cmu.zarr", tmp_path / "finished.zarr")
    reference = segment_slides_ray([plan_slide(slide, tmp_path / "reference.zarr", model, tile_size=256)], model,
                                   progress=False)  # fmt: skip
    assert reference[0].status == "complete"
    assert_identical_stores(tmp_path / "finished.zarr", tmp_path / "reference.zarr")


def test_read_only_output_folder_fails_each_slide_in_one_line(tmp_path):
    model = varied_unet(3)
    slides = [str(shared_file("slides/small-16px.svs")), str(shared_file("slides/boxes-generic.tiff"))]
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        run = segment_batch(slides, folder, model, BatchConfig(tile_size=256, tissue_mask=None), RayOptions(progress=False))
        assert run.report is None  # could not be written; the caller still has the results
        assert len(run.failed) == 2
        for slide, result in zip(slides, run.results):
            assert result.status.startswith(f"failed: {slide}: cannot write its output in {folder}")
            assert "Read-only file system" in result.status and "\n" not in result.status


# --------------------------------------------------------------------------- output safety
def test_a_second_job_on_the_same_output_is_refused(tmp_path):
    model = varied_unet(3)
    slide = shared_file("slides/small-16px.svs")
    out = tmp_path / "out"
    with StoreLock(out / "small-16px.zarr"):  # a live job holds it
        locks: dict = {}
        (entry,) = slide_items([slide], out, model, BatchConfig(tile_size=256, tissue_mask=None), locks)
    assert not locks and not entry.ok
    assert entry.status.startswith(f"failed: {slide}: {out / 'small-16px.zarr'}: another job is writing it (host ")
    assert not (out / "small-16px.zarr").exists()


@pytest.mark.slow
def test_overwrite_replaces_only_its_own_slides_store(ray_local, tmp_path):
    model = varied_unet(3)
    small, boxes = str(shared_file("slides/small-16px.svs")), str(shared_file("slides/boxes-generic.tiff"))
    config = BatchConfig(tile_size=256, tissue_mask=None, previews=False)
    assert not segment_batch([small, boxes], tmp_path, model, config, RayOptions(progress=False)).failed
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "boxes-generic.zarr").rglob("*")}
    config.overwrite = True
    run = segment_batch([small], tmp_path, varied_unet(4), config, RayOptions(progress=False))
    assert [r.status for r in run.results] == ["complete"] and run.results[0].tiles_run == 1
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "boxes-generic.zarr").rglob("*")} == kept


# --------------------------------------------------------------------------- bad input: one job, many cases
def make_bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, text its error line must hold)."""
    import tifffile

    folder.mkdir()
    empty_dir = folder / "empty-dir"
    empty_dir.mkdir()
    (folder / "zero.svs").write_bytes(b"")
    (folder / "notes.svs").write_text("a list of patients, renamed .svs by mistake\n")
    (folder / "truncated.svs").write_bytes(shared_file("slides/cmu-1-small-region.svs").read_bytes()[:300_000])
    tifffile.imwrite(folder / "no-mpp.tif", random_image(64, 64, seed=1), photometric="rgb")
    tifffile.imwrite(folder / "cycif.tif", np.zeros((12, 64, 96), np.uint8), metadata={"axes": "CYX"}, tile=(32, 32))
    tifffile.imwrite(folder / "deep.tif", np.zeros((64, 64, 3), np.uint16), photometric="rgb", tile=(32, 32))
    write_dicom_level(folder / "jpegls.dcm", random_image(32, 32), "1.2.3.4", mpp=0.5, syntax=JPEG_LS_LOSSLESS)
    return {
        "missing": (folder / "missing.svs", "no such slide file or directory"),
        "empty dir": (empty_dir, "directory holds no slides"),
        "unopenable": (shared_file("slides/bad/unopenable.tiff"), "OpenSlide cannot open it"),
        "unreadable": (shared_file("slides/bad/unreadable.svs"), "failed"),
        "zero bytes": (folder / "zero.svs", "the file is empty"),
        "truncated": (folder / "truncated.svs", "may be truncated or corrupt"),
        "text as svs": (folder / "notes.svs", "not a slide"),
        "no mpp with --mpp": (folder / "no-mpp.tif", "has no µm/px metadata"),
        "multiplexed": (folder / "cycif.tif", "12 channels (axes CYX, 96x64 px)"),
        "16-bit": (folder / "deep.tif", "16-bit pixels (uint16)"),
        "DICOM JPEG-LS": (folder / "jpegls.dcm", f"JPEG-LS lossless (transfer syntax {JPEG_LS_LOSSLESS})"),
    }


@pytest.mark.slow
def test_bad_inputs_fail_alone_with_one_line_each_and_good_slides_finish(artifact, tmp_path):
    import tifffile

    bad = make_bad_inputs(tmp_path / "in")
    plain_tiff = tmp_path / "in" / "plain.tif"  # not OpenSlide's: read with tifffile, not refused
    tifffile.imwrite(plain_tiff, random_image(96, 80, seed=2), photometric="rgb", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER")  # 0.5 µm/px  # fmt: skip
    good = [str(shared_file("slides/small-16px.svs")), str(plain_tiff)]
    out = tmp_path / "out"
    done = run_job(*good[:1], *(str(path) for path, _ in bad.values()), good[1], "--out", str(out),
                   "--model", str(artifact), "--mpp", "0.5")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    errors = error_lines(done.stderr)
    for name, (path, reason) in bad.items():
        mine = [line for line in errors if str(path) in line]
        assert len(mine) == 1 and reason in mine[0], (name, mine, errors)
    report = read_run_report(out)
    failures = {f["slide"]: f["reason"] for f in report["summary"]["failures"]}
    assert set(failures) == {str(path) for path, _ in bad.values()}
    assert all("\n" not in reason for reason in failures.values())
    statuses = {Path(s["slide"]).name: s["status"] for s in report["slides"]}
    assert statuses["small-16px.svs"] == statuses["plain.tif"] == "complete"
    assert f"{len(bad)} of {len(bad) + 2} slides failed" in done.stderr
    for name in ("small-16px.zarr", "plain.zarr"):
        assert read_provenance(out / name)["status"] == "complete"
    for path, _ in bad.values():  # a failed slide never leaves a store that looks finished
        store = out / f"{path.stem}.zarr"
        assert not store.exists() or read_provenance(store)["status"] == "running"


@pytest.mark.slow
def test_bad_model_and_options_stop_before_any_slide_with_exit_2(artifact, tmp_path):
    slide = str(shared_file("slides/small-16px.svs"))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(artifact.read_bytes()[:5000])
    grey = save_model(varied_unet(1, in_channels=1), tmp_path / "grey.pt")
    out = tmp_path / "out"
    cases = [
        (["--model", str(corrupt)], "corrupt.pt: not a readable model artifact"),
        (["--model", str(artifact), "--tile-size", "100"], "not a multiple of the model's alignment"),
        (["--model", str(artifact), "--actors", "0"], "actors must be >= 1"),
        (["--model", str(artifact), "--batch-size", "-2"], "batch_size must be a positive integer"),
    ]
    for options, message in cases:
        done = run_job(slide, "--out", str(out), *options, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], (options, done.stderr)
    assert not out.exists()  # nothing written for a run that could not start
    done = run_job(slide, "--out", str(out), "--model", str(grey), timeout=120)  # channels: per slide, exit 1
    assert done.returncode == 1
    assert any("small-16px.svs: has 3 channels but the model expects 1" in line for line in error_lines(done.stderr))
