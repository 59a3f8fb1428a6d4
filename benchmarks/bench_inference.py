"""Inference benchmark: output Mpx/s and peak memory of the in-process engine and the Ray path.

    python benchmarks/bench_inference.py                         # small default run, prints a table
    python benchmarks/bench_inference.py --size 16384 --base-channels 16 64 --executors engine ray --actors 2

Each run segments a synthetic H&E-like pyramidal TIFF (generated once into --workdir) with a
Kaiming-initialised valid U-Net, every tile run (no tissue mask). Memory is the peak of the summed RSS of this
process and all Ray processes (raylet, GCS, workers, actors), sampled every 0.2 s; bounded memory shows as a peak
that does not grow with the slide size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import segment_slide  # noqa: E402
from unet import UNet  # noqa: E402


class MemorySampler:
    """Peak of the summed RSS of this process and every Ray process on the machine, sampled every 0.2 s."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me, page = str(os.getpid()), os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            total = 0
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
                    if pid == me or "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
                        total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
                except (OSError, IndexError, ValueError):  # the process ended meanwhile
                    continue
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(0.2)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def make_slide(workdir: Path, size: int) -> Path:
    from pipeline.synthetic import make_demo_slide

    path = workdir / f"bench-{size}.tiff"
    if not path.exists():
        make_demo_slide(path, height=size, width=size, seed=1)
    return path


def run_engine(slide: Path, model: UNet, args, out: Path) -> tuple[float, int]:
    result = segment_slide(slide, out, model, tile_size=args.tile_size, batch_size=args.batch_size, amp=args.amp,
                           overwrite=True)  # fmt: skip
    return result.seconds, result.tiles_run


def run_ray(slide: Path, model: UNet, args, out: Path) -> tuple[float, int]:
    from pipeline.engine import plan_slide
    from pipeline.ray_runner import segment_slides_ray
    from pipeline.ray_setup import init_ray

    init_ray(num_cpus=args.num_cpus)
    started = time.perf_counter()
    plan = plan_slide(slide, out, model, tile_size=args.tile_size, overwrite=True)
    results = segment_slides_ray([plan], model, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                                 batch_size=args.batch_size, amp=args.amp, progress=False)  # fmt: skip
    return time.perf_counter() - started, results[0].tiles_run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[2048], help="slide side(s) in pixels")
    parser.add_argument("--base-channels", type=int, nargs="+", default=[8, 16], help="U-Net widths to compare")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--amp", default=None, help="bf16 | fp16 | auto (default: float32)")
    parser.add_argument("--executors", nargs="+", default=["engine"], choices=["engine", "ray"])
    parser.add_argument("--actors", type=int, default=1, help="Ray predictor actors")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per Ray actor (0: CPU actors)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--workdir", type=Path, default=None, help="where slides and outputs go (default: a temp dir)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="wsi-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu; workdir {workdir}")
    rows = []
    for size in args.size:
        slide = make_slide(workdir, size)
        for width in args.base_channels:
            torch.manual_seed(0)
            model = UNet(base_channels=width, depth=args.depth).eval()
            for executor in args.executors:
                out = workdir / f"out-{size}-{width}-{executor}.zarr"
                run = run_engine if executor == "engine" else run_ray
                with MemorySampler() as memory:
                    seconds, tiles = run(slide, model, args, out)
                rows.append((executor, size, width, tiles, seconds, size * size / 1e6 / seconds, memory.peak))
                shutil.rmtree(out, ignore_errors=True)
    print("\n| executor | slide px | base ch | tiles | seconds | output Mpx/s | peak RSS MiB (all processes) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for executor, size, width, tiles, seconds, mpx, rss in rows:
        print(f"| {executor} | {size}x{size} | {width} | {tiles} | {seconds:.1f} | {mpx:.3f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
