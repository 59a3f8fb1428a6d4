"""(h) Cohorts: N slides in one command, with a driver that does not grow and few files per gigapixel.

Each N runs ``jobs/segment_slides.py DIR --out OUT`` once, as a user would, on a folder of N hard links to one
small synthetic slide (copies of one file, each its own output). Measured from outside the job:

- time to the first tile: from the job's start (the process spawned) to the first shard marked done on disk
  (the first store's ``shards/done``), and to the first finished slide (the earliest slide line of the report);
- the driver's peak memory: ``VmHWM`` (peak RSS) of the job's own process, which holds the scheduler; Ray's
  processes are not the driver;
- files written per gigapixel of slide: every file under the outputs (stores, previews, report) over N times
  the slide's pixels;
- wall time against the sum of the slides' own times (each slide's seconds from its plan to its finish, from
  the run report): above 1 means slides overlapped.

The 15-gigapixel slide of section (c) is measured apart (:func:`big_slide`): the planning of its store and the
work after its last tile (state check, pyramid by shards, status) on a store whose every tissue shard is written.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["slides", "gigapixels", "first tile s", "first slide s", "wall s", "sum of slide s", "overlap",
           "driver peak RSS MiB", "files", "files per gigapixel", "complete"]  # fmt: skip
FILES_PER_GPX_BEFORE = 33_000  # cmu-1-small-region: 218 files for 6.6 Mpx, one chunk and one state file per tile


def cohort_folder(workdir: Path, slide: Path, count: int) -> Path:
    """``count`` hard links to ``slide`` in their own folder (made once): as many slide files as a real cohort,
    without the disk (symbolic links would be one slide, since inputs are deduplicated by their resolved path)."""
    folder = workdir / f"cohort-{count}"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        link = folder / f"slide-{k:05d}{slide.suffix}"
        if not link.exists():
            os.link(slide, link)
    return folder


class _Watch:
    """Polls a running job: the first shard done on disk, the driver's peak RSS."""

    def __init__(self, pid: int, first_store: Path, started: float) -> None:
        self.pid, self.first_done, self.started = pid, first_store / "shards" / "done" / "c", started
        self.first_tile: float | None = None
        self.peak_rss_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.first_tile is None and self.first_done.is_dir() and any(self.first_done.rglob("*")):
                self.first_tile = time.perf_counter() - self.started
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib = max(self.peak_rss_kib, int(line.split()[1]))
            except OSError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_cohort(workdir: Path, slide: Path, count: int, model: Path, *, tile_size: int, batch_size: int) -> dict:
    from pipeline.inference.report import read_run_report
    from pipeline.slides.pyramid import open_slide

    folder = cohort_folder(workdir, slide, count)
    out = workdir / f"cohort-{count}-out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    command = [sys.executable, str(REPO / "jobs" / "segment_slides.py"), str(folder), "--out", str(out),
               "--model", str(model), "--tile-size", str(tile_size), "--batch-size", str(batch_size),
               "--no-progress", "--num-cpus", str(os.cpu_count() or 2)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray
    log = workdir / f"cohort-{count}.log"
    started, spawned = time.perf_counter(), time.time()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT)
        watch = _Watch(process.pid, out / "slide-00000.zarr", started)
        code = process.wait()
    wall = time.perf_counter() - started
    watch.stop()
    if code != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {code}; see {log}")
    report = read_run_report(out)
    finished = sorted(_seconds(s["finished"]) for s in report["slides"])
    first_slide = round(finished[0] - spawned, 3) if finished else None
    height, width = open_slide(slide).size
    gigapixels = count * height * width / 1e9
    files = sum(1 for p in out.rglob("*") if p.is_file())
    return {
        "slides": count, "gigapixels": round(gigapixels, 3),
        "first_tile_s": None if watch.first_tile is None else round(watch.first_tile, 3),
        "first_slide_s": first_slide, "wall_s": round(wall, 1),
        "sum_slide_s": round(sum(s["seconds"] for s in report["slides"]), 1),
        "driver_peak_rss_mib": round(watch.peak_rss_kib / 1024, 1), "files": files,
        "files_per_gpx": round(files / gigapixels), "complete": report["summary"]["complete"], "command": command,
    }  # fmt: skip


def _seconds(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso).timestamp()


def big_slide(workdir: Path, slide: Path, model_path: Path, tile_size: int) -> dict[str, Any]:
    """Planning (open, tissue, store) of a big slide, and the work after its last tile on a store whose every
    tissue shard is written: the state check, the pyramid by shards and ``status: complete``."""
    from pipeline.inference.engine import plan_slide
    from unet import load_model

    model = load_model(model_path)
    out = workdir / "big-slide.zarr"
    started = time.perf_counter()
    plan = plan_slide(slide, out, model, tile_size=tile_size, tissue_mask=True, overwrite=True)
    planning = time.perf_counter() - started
    pattern = _label_pattern(plan.grid.shard_side)
    started = time.perf_counter()
    for shard in plan.shards:  # what the actors would have written: plausible labels, every tissue shard
        h, w = shard.shape
        plan.store.write_shard(shard, pattern[:h, :w])
    writing = time.perf_counter() - started
    started = time.perf_counter()
    plan.finalize()
    after = time.perf_counter() - started
    files = sum(1 for p in out.rglob("*") if p.is_file())
    height, width = plan.grid.shape
    before = files_before_shards(plan.grid.shape, tile_size, plan.tiles_to_run, plan.skipped)
    return {"slide": str(slide), "shape": [height, width], "gigapixels": round(height * width / 1e9, 3),
            "tiles_to_run": plan.tiles_to_run, "tiles_skipped": plan.skipped, "shards_written": len(plan.shards),
            "planning_s": round(planning, 1), "shard_writes_s": round(writing, 1), "after_last_tile_s": round(after, 1),
            "files": files, "files_per_gpx": round(files / (height * width / 1e9)), "files_before": before,
            "files_per_gpx_before": round(before / (height * width / 1e9))}  # fmt: skip


def files_before_shards(shape: tuple[int, int], tile: int, run: int, skipped: int) -> int:
    """Files the same store had before shards, counted from that layout (not measured): a state file per tile
    (run or skipped), a label chunk per tile run, every chunk of pyramid levels 1..k, and 12 metadata files."""
    from pipeline.store.label_pyramid import pyramid_shapes

    pyramid = sum(-(-h // tile) * -(-w // tile) for h, w in pyramid_shapes(shape, tile)[1:])
    return (run + skipped) + run + pyramid + 12


def _label_pattern(side: int) -> np.ndarray:
    """Nucleus-like discs of class 1 on background: what a shard of real labels compresses like."""
    y, x = np.mgrid[0:side, 0:side]
    return (((y % 24 - 12) ** 2 + (x % 24 - 12) ** 2) < 49).astype(np.uint8)


BIG_COLUMNS = ["slide px", "gigapixels", "tiles run", "tiles skipped", "planning s", "after last tile s", "files",
               "files per gigapixel", "before shards (counted)", "fewer"]  # fmt: skip


def run(workdir: Path, counts: list[int], *, slide_side: int, model_kind: str, default_model: Path, tile_size: int,
        batch_size: int, big_gigapixels: list[float], mosaic_base: int) -> dict[str, Any]:  # fmt: skip
    from benchmarks.slides import slide_of_size, small_model, synthetic_slide

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    slide = synthetic_slide(workdir, slide_side)
    model = small_model(workdir) if model_kind == "small" else default_model
    records = [run_cohort(workdir, slide, n, model, tile_size=tile_size, batch_size=batch_size) for n in counts]
    rows = [[r["slides"], r["gigapixels"], r["first_tile_s"], r["first_slide_s"], r["wall_s"], r["sum_slide_s"],
             round(r["sum_slide_s"] / r["wall_s"], 2), r["driver_peak_rss_mib"], r["files"], r["files_per_gpx"],
             r["complete"]] for r in records]  # fmt: skip
    notes = [f"each slide: {slide.name} ({slide_side}x{slide_side} px, ~30 % tissue), model {Path(model).name}, "
             f"tile {tile_size}; files per gigapixel before shards: ~{FILES_PER_GPX_BEFORE} (README)."]
    section: dict[str, Any] = {"columns": COLUMNS, "rows": rows, "records": records, "notes": notes}
    bigs = [big_slide(workdir, slide_of_size(workdir, gpx, mosaic_base), Path(model), tile_size)
            for gpx in big_gigapixels or []]  # fmt: skip
    if bigs:
        section["big_slides"] = {
            "columns": BIG_COLUMNS, "records": bigs,
            "rows": [[f"{b['shape'][1]}x{b['shape'][0]}", b["gigapixels"], b["tiles_to_run"], b["tiles_skipped"],
                      b["planning_s"], b["after_last_tile_s"], b["files"], b["files_per_gpx"], b["files_per_gpx_before"],
                      round(b["files_before"] / b["files"], 1)] for b in bigs],
        }  # fmt: skip
        notes.append("big slides: planned with the tissue mask, then every shard with tissue written with plausible "
                     "labels without the model, then finalized (benchmarks/cohort.py:big_slide); the 'big_slides' "
                     "table is in the JSON and printed below.")  # fmt: skip
    return section
