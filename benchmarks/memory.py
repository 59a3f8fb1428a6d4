"""(c) Peak memory of ALL the job's processes vs slide size.

Each size runs the real command, ``python jobs/segment_slides.py SLIDE --out DIR --model M --overwrite
--no-progress`` (tissue mask on, its default), in a fresh process on a fresh local Ray; the sampler sums
PSS and RSS over that process and all its descendants (GCS, raylet, dashboard agents, Ray Data's helper
actors, idle workers, read/write tasks, the model actor) every second. Memory that stays flat from 0.1
to 16 gigapixels is memory bounded by the stream, not by the slide.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, TreeMemory, load_watch
from benchmarks.slides import slide_of_size, small_model

COLUMNS = ["slide px", "gigapixels", "made as", "tiles run", "tiles skipped", "job wall s", "peak PSS MiB (all)",
           "peak RSS MiB (all)", "processes", "biggest at the peak (PSS MiB)", "load (1 min)"]  # fmt: skip


def run_job(slide: Path, model: Path, out: Path, tile_size: int, batch_size: int, log: Path) -> dict[str, Any]:
    """jobs/segment_slides.py on one slide in a fresh process tree; its report and peak memory."""
    command = [sys.executable, str(REPO / "jobs" / "segment_slides.py"), str(slide), "--out", str(out),
               "--model", str(model), "--overwrite", "--no-progress", "--tile-size", str(tile_size),
               "--batch-size", str(batch_size)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a private local Ray
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        with TreeMemory(process.pid, interval=1.0) as memory:
            code = process.wait()
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log}")
    from pipeline.inference.report import read_run_report

    report = read_run_report(out)
    (slide_report,) = report["slides"]
    return {"wall_s": wall, "report": slide_report, "memory": memory.as_dict(), "command": command}


def run(workdir: Path, sizes_gpx: list[float], *, model_kind: str, mosaic_base: int, tile_size: int,
        batch_size: int, default_model: Path) -> dict[str, Any]:  # fmt: skip
    model = small_model(workdir) if model_kind == "small" else default_model
    records, rows = [], []
    for gpx in sizes_gpx:
        slide = slide_of_size(workdir, gpx, mosaic_base)
        out = workdir / "memory-out"
        record: dict[str, Any] = {"gigapixels_asked": gpx, "slide": str(slide)}
        with load_watch(record):
            record.update(run_job(slide, model, out, tile_size, batch_size, workdir / f"memory-{slide.stem}.log"))
        report, memory = record["report"], record["memory"]
        height, width = report["shape"]
        biggest = ", ".join(f"{name} {mib:.0f}" for name, mib in list(memory["pss_at_peak_mib"].items())[:3])
        made = "rendered" if slide.name.startswith("synthetic") else slide.name.split("-of-")[1].split("-")[0] + " px mosaic"
        rows.append([f"{width}x{height}", round(height * width / 1e9, 3), made, report["tiles_run"],
                     report["tiles_skipped"], record["wall_s"], memory["peak_pss_mib"], memory["peak_rss_mib"],
                     memory["processes"], biggest, f"{record['load_before'][0]} -> {record['load_after'][0]}"])  # fmt: skip
        records.append(record)
    return {
        "columns": COLUMNS, "rows": rows, "records": records, "model": str(model),
        "notes": [
            f"model: {Path(model).name} ({model_kind}); tile {tile_size}, batch {batch_size}, tissue mask on, 1 actor; "
            "PSS splits shared pages (Ray's object store, libraries) between processes, RSS counts them in each. "
            "'made as': rendered by pipeline.demo.synthetic, or a mosaic of a rendered slide's JPEG tiles "
            "(benchmarks/slides.py).",
        ],
    }  # fmt: skip
