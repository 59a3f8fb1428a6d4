"""(g) Durability: what the fsyncs cost per shard, per store creation and per finalize.

The same shard writes (``OutputStore.write_shard``: label shard, optionally probabilities, then its done
mark) and the same store life cycle (create, finalize) are timed twice on the same disk: as the job runs
them, and with ``os.fsync`` replaced by a no-op (what they cost without durability). The difference is
the price of surviving a power loss; it depends on the disk (a local NVMe, a VM's virtual disk, NFS).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

COLUMNS = ["step", "fsync", "count", "ms each", "syncs each", "overhead ms each"]


@contextmanager
def counted_fsync(enabled: bool):
    """Count the syncs (fsync, and syncfs of a big tree); with ``enabled`` False they do nothing (the cost
    without durability)."""
    from pipeline.store import durability

    real_fsync, real_syncfs, calls = os.fsync, durability.sync_filesystem, [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if enabled:
            real_fsync(fd)

    def syncfs(path) -> None:
        calls[0] += 1
        if enabled:
            real_syncfs(path)

    os.fsync, durability.sync_filesystem = fsync, syncfs
    try:
        yield calls
    finally:
        os.fsync, durability.sync_filesystem = real_fsync, real_syncfs


def _one_pass(workdir: Path, enabled: bool, side: int, tile_size: int, probabilities: bool,
              shard_tiles: int = 16) -> dict[str, tuple]:  # fmt: skip
    from pipeline.inference.engine import plan_slide
    from unet import UNet, UNetConfig

    model = UNet(UNetConfig(base_channels=4, depth=2, num_classes=3))
    image = np.full((side, side, 3), 200, np.uint8)
    path = workdir / f"durability-{'on' if enabled else 'off'}-{int(probabilities)}.zarr"
    rng = np.random.default_rng(0)
    shard_side = tile_size * shard_tiles
    labels = rng.integers(0, 3, (shard_side, shard_side)).astype(np.uint8)
    probs = rng.integers(0, 255, (3, shard_side, shard_side)).astype(np.uint8) if probabilities else None
    timings = {}
    with counted_fsync(enabled) as calls:
        started = time.perf_counter()
        plan = plan_slide(image, path, model, tile_size=tile_size, probabilities=probabilities, mpp=0.5, overwrite=True,
                          shard_tiles=shard_tiles)  # fmt: skip
        timings["create store"] = (1, time.perf_counter() - started, calls[0])
        calls[0], started = 0, time.perf_counter()
        for shard in plan.shards:
            plan.store.write_shard(shard, labels, probs)
        timings["write shard" + (" + probabilities" if probabilities else "")] = (
            len(plan.shards), time.perf_counter() - started, calls[0])  # fmt: skip
        calls[0], started = 0, time.perf_counter()
        plan.finalize()
        timings["finalize"] = (1, time.perf_counter() - started, calls[0])
    return timings


def _median_pass(workdir: Path, enabled: bool, side: int, tile_size: int, probabilities: bool, repeats: int,
                 shard_tiles: int) -> dict:  # fmt: skip
    """Each step's (count, median seconds, fsyncs) over ``repeats`` passes (store creation is one noisy event)."""
    runs = [_one_pass(workdir, enabled, side, tile_size, probabilities, shard_tiles) for _ in range(repeats)]
    return {step: (runs[0][step][0], float(np.median([r[step][1] for r in runs])), runs[0][step][2]) for step in runs[0]}


def run(workdir: Path, side: int = 8192, tile_size: int = 256, repeats: int = 5, shard_tiles: int = 16) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    _one_pass(workdir, False, 512, tile_size, True)  # warm-up: imports, zarr's first writes
    for probabilities in (False, True):
        passes = {enabled: _median_pass(workdir, enabled, side, tile_size, probabilities, repeats, shard_tiles) for enabled in (False, True)}
        for step, (count, seconds, fsyncs) in passes[True].items():
            if probabilities and step in ("create store", "finalize"):
                continue
            _, base, no_ops = passes[False][step]
            rows.append([step, "on (the job)", count, round(1000 * seconds / count, 3), round(fsyncs / count, 1),
                         round(1000 * (seconds - base) / count, 3)])  # fmt: skip
            rows.append([step, "off (no-op)", count, round(1000 * base / count, 3), round(no_ops / count, 1), 0.0])
    notes = [f"{side}x{side} px store, tile {tile_size}, shards of {shard_tiles} x {shard_tiles} tiles (one file per shard), {workdir} on "
             "this machine's disk; "
             f"median of {repeats} passes per mode. 'syncs each': fsync calls (files and folders) and syncfs calls, made in both modes (no-ops when off)."]
    return {"columns": COLUMNS, "rows": rows, "notes": notes}
