"""(a) Pipeline efficiency: end-to-end output Mpx/s of the job's code path ÷ the bare model forward.

End to end is :func:`pipeline.inference.batch.segment_batch`, what ``jobs/segment_slides.py`` runs: plan (open the
slide, grid, store), the Ray Data stream (read windows -> model actors -> write Zarr chunks), the viewer
pyramid, the preview PNG and the run report, timed around the call on an already started local Ray (as on
a cluster, where Ray is up before the job). Every tile runs (no tissue mask), so the output pixels are the
tiles' pixels.

The bare forward is :class:`pipeline.inference.predict.TilePredictor` (the fused uint8 -> normalise -> forward ->
argmax -> crop step the actors run) on windows read from the same slide beforehand, with the same tile
shape, batch size, device and torch thread count as one actor, measured just before and just after the
pipeline run (their mean is the denominator; both are reported so drift shows). Like the actor it runs in
a process of its own at the niceness Ray gives its workers (15; Ray's control processes and the driver
stay at 0), so other load on a shared machine weighs on both alike.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import TreeMemory, load_watch, process_tree, run_isolated, timed_rate

COLUMNS = ["config", "precision", "actor threads", "Ray CPUs", "tiles", "end-to-end s", "end-to-end Mpx/s",
           "bare forward Mpx/s", "efficiency", "beyond the forward s", "model busy", "forward Mpx/s in the actor",
           "peak PSS MiB", "load (1 min)"]  # fmt: skip


def pre_read_windows(slide_path: Path, model: torch.nn.Module, tile_size: int, batch_size: int,
                     forward_tiles: int | None = None, batches: int = 4):  # fmt: skip
    """``batches`` batches of real input windows from the middle shard of the slide (tissue and glass), formed
    as the job's shard path forms them: forward windows of ``forward_tiles`` tiles a side (None: the job's
    default), batches of ``batch_size`` tiles' pixels."""
    from pipeline.inference.predict import default_forward_tiles
    from pipeline.inference.tile_batches import cut_windows, forward_batches
    from pipeline.slides.geometry import default_shard_tiles, forward_windows, tile_grid_for_model
    from pipeline.slides.pyramid import open_slide
    from pipeline.slides.shard_blocks import ShardBlocks

    slide = open_slide(slide_path)
    grid = tile_grid_for_model(model, slide.size, tile_size, shard_tiles=default_shard_tiles(tile_size))
    shards = grid.shards()
    shard = shards[len(shards) // 2]
    region, origin = ShardBlocks(slide, grid).read(shard)
    windows = forward_windows(grid, shard, forward_tiles or default_forward_tiles(tile_size))
    return grid, [cut_windows(region, origin, grid, batch)
                  for batch in list(forward_batches(windows, tile_size, batch_size))[:batches]]  # fmt: skip


def tiles_to_run(slide: Path, model, tile_size: int, target_mpp: float | None) -> int:
    """Tiles of the slide at the level the run segments (every tile runs: no tissue mask here)."""
    from pipeline.slides.geometry import tile_grid_for_model
    from pipeline.slides.pyramid import open_slide
    from pipeline.slides.resolution import open_at_mpp

    view = open_at_mpp(slide, target_mpp) if target_mpp else open_slide(slide)
    return len(tile_grid_for_model(model, view.size, tile_size))


def bare_forward(model, grid, windows: list[np.ndarray], threads: int, seconds: float, device: str = "cpu",
                 amp: str | None = None, compile: bool | str = False) -> dict[str, Any]:  # fmt: skip
    """Mpx/s of TilePredictor on pre-read windows (cycled), with ``threads`` torch threads on CPU."""
    from pipeline.inference.predict import TilePredictor

    saved = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(threads)
    try:
        tiles_per_batch = len(windows[0]) * ((windows[0].shape[1] - grid.reach) // grid.tile_size) ** 2
        predictor = TilePredictor.for_grid(model, grid, device=device, amp=amp, compile=compile,
                                           batch_size=tiles_per_batch)  # fmt: skip
        state = {"i": 0}

        def step() -> int:
            batch = windows[state["i"] % len(windows)]
            state["i"] += 1
            predictor(batch)
            if device != "cpu":
                torch.cuda.synchronize()  # (labels are copied to the host anyway)
            return len(batch) * (batch.shape[1] - grid.reach) ** 2  # output pixels (a window may hold 2 x 2 tiles)

        return timed_rate(step, seconds)
    finally:
        torch.set_num_threads(saved)


def _bare_forward_niced(niceness: int, *args: Any) -> dict[str, Any]:
    import os

    os.nice(max(0, niceness - os.nice(0)))
    return bare_forward(*args)


def isolated_bare_forward(niceness: int, *args: Any) -> dict[str, Any]:
    """:func:`bare_forward` in a fresh process at ``niceness`` (as the actor runs)."""
    result, _ = run_isolated(_bare_forward_niced, niceness, *args)
    return result


def worker_niceness() -> int:
    """The niceness of this driver's Ray worker processes (Ray starts them at 15), 0 if none is found."""
    import os

    for pid in process_tree(os.getpid()):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                stat = Path(f"/proc/{pid}/stat").read_text()
                return int(stat[stat.rindex(")") + 2 :].split()[16])
        except (OSError, ValueError, IndexError):
            continue
    return 0


def pipeline_run(slide: Path, model, out_dir: Path, options, tile_size: int, tissue_mask: Any = None,
                 previews: bool = True, target_mpp: float | None = None) -> dict:  # fmt: skip
    """segment_batch on one slide (Ray already started): wall seconds, tiles, output Mpx/s, peak memory.
    ``target_mpp``: segment at that µm/px (resampled reads when it is not a level's)."""
    from pipeline.inference.batch import BatchConfig, segment_batch

    shutil.rmtree(out_dir, ignore_errors=True)
    config = BatchConfig(tile_size=tile_size, tissue_mask=tissue_mask, overwrite=True, previews=previews,
                         target_mpp=target_mpp)  # fmt: skip
    with TreeMemory() as memory:
        started = time.perf_counter()
        run = segment_batch([str(slide)], out_dir, model, config, options)
        wall = time.perf_counter() - started
    (result,) = run.results
    if result.status != "complete":
        raise RuntimeError(f"benchmark run failed: {result.status}")
    pixels = result.tiles_run * config.tile_size**2
    return {
        "wall_s": wall, "stream_s": result.seconds, "tiles_run": result.tiles_run, "tiles_skipped": result.tiles_skipped,
        "output_mpx": pixels / 1e6, "mpx_per_s": pixels / 1e6 / wall, "memory": memory.as_dict(),
        "model_seconds": result.model_seconds, "model_busy": result.model_seconds / wall,
        "actor_forward_mpx_per_s": pixels / 1e6 / result.model_seconds if result.model_seconds else None,
        "store": result.output,
    }  # fmt: skip


def start_ray(num_cpus: int | None) -> None:
    """A local Ray with ``num_cpus`` logical CPUs (None: the machine's); a running one is kept if it matches."""
    import os

    import ray

    from benchmarks.common import REPO
    from pipeline.inference.ray_setup import init_ray

    if ray.is_initialized():
        if ray.cluster_resources().get("CPU") == (num_cpus or os.cpu_count()):
            return
        ray.shutdown()
    init_ray(num_cpus=num_cpus, repo_root=REPO)
    time.sleep(5)  # let the new instance finish starting its processes before anything is timed


def measure(slide: Path, model, workdir: Path, *, label: str, options, num_cpus: int | None, tile_size: int,
            forward_seconds: float, previews: bool = True, isolate: bool = True,
            target_mpp: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One row: bare forward (before), the job's pipeline, bare forward (after). ``isolate=False`` measures the
    bare forward in this process at this process's niceness (quicker; for tests). ``target_mpp``: the
    pipeline reads resampled; the bare forward's windows are native (the forward's cost does not depend on them)."""
    from pipeline.inference.predict import resolve_compile
    from pipeline.inference.ray_runner import actor_threads

    grid, windows = pre_read_windows(slide, model, tile_size, options.batch_size, options.forward_tiles)
    start_ray(num_cpus)
    threads = actor_threads(options)  # what the job gives its actor
    record: dict[str, Any] = {"config": label, "options": asdict(options), "threads": threads, "num_cpus": num_cpus,
                              "precision": precision_name(options.amp, options.device)}  # fmt: skip
    record["niceness"] = niceness = worker_niceness() if isolate else None
    compile = resolve_compile(options.compile, torch.device(options.device), tiles_to_run(slide, model, tile_size,
                                                                                            target_mpp))  # fmt: skip
    record["compile"] = compile  # what the job's --compile comes to for this slide; the bare forward does the same
    forward = (model, grid, windows, threads, forward_seconds, options.device, options.amp, compile)
    bare = (lambda: isolated_bare_forward(niceness, *forward)) if isolate else (lambda: bare_forward(*forward))
    with load_watch(record):
        before = bare()
        run = pipeline_run(slide, model, workdir / f"eff-{label.replace(', ', '-')}", options, tile_size,
                           previews=previews, target_mpp=target_mpp)  # fmt: skip
        after = bare()
    rate = (before["mpx_per_s"] + after["mpx_per_s"]) / 2
    record.update(pipeline=run, bare_before=before, bare_after=after, bare_mpx_per_s=rate,
                  efficiency=run["mpx_per_s"] / rate, overhead_s=run["wall_s"] - run["output_mpx"] / rate)  # fmt: skip
    return record


def row(record: dict[str, Any]) -> list[Any]:
    run = record["pipeline"]
    precision = record["precision"] + (", compiled" if record.get("compile") else "")
    return [record["config"], precision, record["threads"], record["num_cpus"] or "all", run["tiles_run"], run["wall_s"],
            run["mpx_per_s"], record["bare_mpx_per_s"], record["efficiency"], record["overhead_s"], run["model_busy"],
            run["actor_forward_mpx_per_s"], run["memory"]["peak_pss_mib"],
            f"{record['load_before'][0]} -> {record['load_after'][0]}"]  # fmt: skip


def configs(cpus: int, actors: int, batch_size: int) -> list[tuple[str, dict, int | None]]:
    """(label, RayOptions overrides, Ray CPUs): the job's default layout, and one torch thread per actor.

    Default: each actor reserves 1 Ray CPU and runs torch on all of its node's cores (shared by the node's
    actors), its reads and writes beside them. "1 thread": the layout before 2026-12-02, one torch thread per
    actor and the other cores left to reading and writing."""
    layouts = [("default", {}, None)]
    if cpus // actors > 1:
        layouts.append(("1 thread", {"threads_per_actor": 1}, None))
    return [(label, {"actors": actors, "batch_size": batch_size, "progress": False, **extra}, n)
            for label, extra, n in layouts]  # fmt: skip


def precision_name(amp: str | None, device: str) -> str:
    """What ``amp`` resolves to on ``device`` here: "bfloat16", "float16" or "float32"."""
    from pipeline.inference.predict import resolve_amp, resolve_device

    dtype = resolve_amp(amp, resolve_device(device))
    return str(dtype or torch.float32).removeprefix("torch.")


def run(slide: Path, model, workdir: Path, *, tile_size: int, batch_size: int, actors: int, forward_seconds: float,
        layouts: list[str] | None = None, amp: str | None = "auto",
        reads: tuple[str, ...] = ("native",), compile: bool | str = False,
        forward_tiles: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Each layout, with native reads and/or ``"resampled"`` ones (segmented at twice the slide's µm/px)."""
    import os

    import ray

    from pipeline.inference.ray_runner import RayOptions
    from pipeline.slides.pyramid import open_slide

    mpp = open_slide(slide).mpp
    records = []
    try:
        for label, overrides, num_cpus in configs(os.cpu_count() or 1, actors, batch_size):
            if layouts and label not in layouts:
                continue
            for read in reads:
                target_mpp = 2 * mpp if read == "resampled" else None
                records.append(measure(slide, model, workdir, label=f"{label}, {read}",
                                       options=RayOptions(**overrides, amp=amp, compile=compile,
                                                          forward_tiles=forward_tiles), num_cpus=num_cpus,
                                       tile_size=tile_size, forward_seconds=forward_seconds,
                                       target_mpp=target_mpp))  # fmt: skip
    finally:
        ray.shutdown()
    return {
        "columns": COLUMNS, "rows": [row(r) for r in records], "records": records, "slide": str(slide),
        "notes": [
            "efficiency = end-to-end Mpx/s (segment_batch: plan, Ray stream read -> actors -> Zarr, pyramid, preview, "
            "report; Ray already started) / bare TilePredictor Mpx/s on pre-read windows with the actor's torch "
            "threads, same tile, batch and device (mean of before and after the run), in a process at the Ray "
            "workers' niceness. 'beyond the forward': end-to-end seconds minus the bare forward's time for the same "
            "tiles (start-up of the actor and task workers, reads, writes, pyramid, preview, report). 'model busy': "
            "the share of the end-to-end time the actor spent in forward passes (timed in the actor, so immune to the "
            "machine's speed drifting between measurements); efficiency ~= model busy x (forward Mpx/s in the actor / "
            "bare forward Mpx/s). 'resampled': segmented at twice the slide's µm/px, so every window is resampled by "
            "2 from level 0 (what a 0.25 µm/px scan costs a 0.5 µm/px model); Mpx/s counts output pixels.",
        ],
    }  # fmt: skip
