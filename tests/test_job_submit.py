"""End to end as a user runs it: `ray start --head` on loopback, `ray job submit -- python jobs/segment_slides.py`.

The job's stores must match the in-process engine exactly. The cluster is private to this test (own
temp dir and ports) and only its own processes are stopped afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import shared_file, torch_threads, varied_unet
from pipeline import open_labels, segment_slide
from unet import save_model

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def stop_processes_mentioning(marker: str, grace_s: float = 10.0) -> None:
    """Stop only the Ray processes of this test's cluster (``ray stop`` would stop every Ray on the machine):
    SIGTERM, then SIGKILL whatever is left after ``grace_s`` (gcs_server may ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_mentioning(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while processes_mentioning(marker) and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head_node():
    if shutil.which(RAY) is None and not Path(RAY).exists():
        pytest.skip("the `ray` command is not installed beside this Python")
    temp_dir = tempfile.mkdtemp(prefix="wsi-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    try:
        for attempt in (1, 2):  # a free port can be taken by another process before Ray binds it: once more
            dashboard = free_port()
            start = [
                RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
                "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2", "--include-dashboard=true",
                f"--temp-dir={temp_dir}",
                # the agent's default port (52365) is taken if any other Ray runs on this machine: jobs then fail
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            ]  # fmt: skip
            started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
            if started.returncode == 0:
                break
            stop_processes_mentioning(temp_dir)
        assert started.returncode == 0, f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}"
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}"}
    finally:
        stop_processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_segments_several_slides_exactly(head_node, tmp_path):
    slides = [shared_file("slides/cmu-1-small-region.svs"), shared_file("slides/small-16px.svs")]
    model = varied_unet()
    artifact = save_model(model, tmp_path / "model.pt")
    out = tmp_path / "results"
    submit = [
        RAY, "job", "submit", "--address", head_node["address"], "--working-dir", str(ROOT), "--",
        sys.executable, "jobs/segment_slides.py", *map(str, slides), "--out", str(out), "--model", str(artifact),
        "--tile-size", "256", "--no-tissue-mask", "--actors", "1", "--threads-per-actor", "1",
    ]  # fmt: skip
    for attempt in range(10):  # right after `ray start` the job agent may not be up yet: Ray says to retry
        job = subprocess.run(submit, env=head_node["env"], capture_output=True, text=True, timeout=600)
        if job.returncode == 0 or "No available agent" not in job.stdout + job.stderr:
            break
        time.sleep(3)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    for slide in slides:
        store = out / f"{slide.stem}.zarr"
        assert dict(zarr.open_group(str(store), mode="r").attrs["wsi_unet"])["status"] == "complete"
        with torch_threads(1):  # the job's precision (--amp auto) with its actor's thread count
            reference = segment_slide(slide, tmp_path / f"ref-{slide.stem}.zarr", model, tile_size=256, amp="auto")
        assert np.array_equal(open_labels(store)[...], open_labels(reference.output)[...])
    assert list((out / "run-reports").glob("*.jsonl"))
