"""The performance benchmark: one command, one Markdown table per section, all figures in one JSON file.

    python benchmarks/run.py --workdir /tmp/wsi-bench             # every section at full size
    python benchmarks/run.py --quick --workdir /tmp/wsi-bench     # small sizes, a few minutes
    python benchmarks/run.py --sections gpu --peak-tflops 790     # on a CUDA machine: the GPU section

Sections (``--sections``, default all):
  efficiency  end-to-end Mpx/s of the job's code path (segment_batch) / bare TilePredictor forward, same run
  peer        MONAI sliding_window_inference (overlap 0.25 constant, 0.5 gaussian) vs ours: speed, memory,
              distance from whole-image inference (needs `pip install -e ".[bench]"`)
  memory      peak PSS/RSS of all the job's processes (jobs/segment_slides.py and its Ray processes) vs slide size
  tissue      wall time with and without the tissue mask on a ~30 % tissue slide
  gpu         paper U-Net in bf16 on CUDA: Mpx/s, FLOPs per output pixel, fraction of peak, channels_last,
              torch.compile, CUDA graphs, end to end; on a machine without CUDA only the FLOP count runs
  reads       input windows per second at level 0 and at a non-integer level 1: OpenSlide regions (the reader
              before native reads) vs the native TIFF reader (1 and default decode threads) vs tifffile via zarr
  durability  cost of the fsyncs per shard written, per store created and per finalize (same writes, fsync on/off)
  cohort      N slides (copies of one) in one job: time to the first tile and slide, the driver's peak memory,
              files per gigapixel, wall vs the slides' own times; a big slide's planning and after-last-tile work
  cpu         forward Mpx/s, GFLOP/s and share of a measured matmul peak per precision, layout and thread count;
              argmax agreement with float32 on cmu-1 and a synthetic slide; tiled vs whole per mode; resampled reads
  instances   out-of-core exact nuclei instance labelling of a synthetic class map: s per gigapixel vs one read

Slides and models are generated once into --workdir (keep it between runs); results go to
benchmarks/results/bench-<time>.json unless --json is given.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SECTIONS = ("efficiency", "peer", "memory", "tissue", "gpu", "reads", "durability", "cohort", "cpu", "instances")
TITLES = {
    "efficiency": "(a) Pipeline efficiency: end-to-end ÷ bare forward",
    "peer": "(b) Peer comparison: MONAI sliding_window_inference, same model, same image",
    "memory": "(c) Peak memory of all the job's processes vs slide size",
    "tissue": "(d) Tissue skipping on a ~30 % tissue slide",
    "gpu": "(e) GPU: paper U-Net in bf16",
    "reads": "(f) Slide reads: OpenSlide regions (before) vs native tiles (after)",
    "durability": "(g) Durability: the cost of fsync per shard, store creation and finalize",
    "cohort": "(h) Cohorts: N slides in one command (first tile, driver memory, files per gigapixel)",
    "cpu": "(i) CPU modes: precision and layout against the CPU's peak, with exactness; resampled reads",
    "instances": "(j) Nuclei instances: out-of-core exact labelling vs reading the class map once",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--quick", action="store_true", help="small sizes everywhere (smoke run, a few minutes on 2 cores)")
    add("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run (default: all)")
    add("--workdir", type=Path, default=Path("/tmp/wsi-bench"), help="cached slides and models, outputs")
    add("--json", type=Path, default=None, help="results file (default benchmarks/results/bench-<time>.json)")
    add("--model", type=Path, default=None, help="model artifact (default: the bundled models/nuclei-unet.pt)")
    add("--tile-size", type=int, default=256, help="output tile side (default 256, the job's default)")
    add("--batch-size", type=int, default=4, help="tiles per forward pass (default 4, the job's default)")
    add("--forward-tiles", type=int, default=None,
        help="tiles per side of one forward window in the efficiency runs, as the job's --forward-tiles (default: the "
        "job's, 2 for tiles of 256; 1 = every tile alone, the job before 2026-12-02 16:00 UTC)")
    add("--actors", type=int, default=1, help="model actors for the Ray runs (default 1)")
    add("--slide-size", type=int, default=None,
        help="side of the efficiency/tissue slide in px (default 12288, 0.15 gigapixel; --quick 2048)")
    add("--forward-seconds", type=float, default=None, help="seconds per bare-forward measurement (default 20)")
    add("--layouts", nargs="+", default=["default"],
        help="efficiency layouts: 'default' (the job's: the actor's torch threads on every core, beside its reads and "
        "writes) and/or '1 thread' (one torch thread, the other cores left to reads and writes; the default before "
        "2026-12-02)")
    add("--amp", choices=("auto", "bf16", "off"), default="auto",
        help="precision of the efficiency and peer runs, as the job's --amp (default auto: bf16 where the CPU has it)")
    add("--compile", nargs="?", const="on", choices=("auto", "on", "off"), default="off",
        help="the efficiency runs' --compile, as the job's (default off; auto: compiled on CPU for slides of 8192 "
        "tiles or more); the bare forward follows what it comes to for the slide")
    add("--efficiency-reads", nargs="+", choices=("native", "resampled"), default=["native", "resampled"],
        help="efficiency runs reading the slide natively and/or resampled by 2 (default: both)")
    add("--peer-size", type=int, default=None, help="side of the in-memory image of the peer comparison (2048)")
    add("--memory-sizes", type=float, nargs="+", default=None,
        help="slide sizes in gigapixels for the memory section (default 0.1 1 4 16; --quick 0.01 0.04)")
    add("--memory-model", choices=("small", "default"), default="small",
        help="model of the memory runs: 'small' (valid U-Net depth 3, 4 base channels, ~25x cheaper) or the bundled one")
    add("--mosaic-base", type=int, default=10240,
        help="slides larger than this side are mosaics of the rendered slide of this side (see benchmarks/slides.py)")
    add("--peak-tflops", type=float, default=790.0, help="dense bf16 peak of the GPU in TFLOP/s (H200: ~790)")
    add("--gpu-tiles", type=int, nargs="+", default=None, help="GPU output tile sides (default 388 900 1284 1668 2052)")
    add("--gpu-batches", type=int, nargs="+", default=None, help="GPU batch sizes (default 1 4 16)")
    add("--gpu-slide-gpx", type=float, default=4.0, help="GPU end-to-end slide size in gigapixels (default 4)")
    add("--gpu-real-slide", type=Path, default=None, help="a real slide for the GPU end to end (bundled model)")
    add("--gpu-e2e-tile", type=int, default=1024, help="output tile of the GPU end-to-end runs (default 1024)")
    add("--gpu-mosaic-base", type=int, default=None, help="rendered base of the GPU mosaic slide (default --mosaic-base)")
    add("--gpu-dry-run", action="store_true",
        help="run every step of the GPU section on the CPU at toy sizes (checks the script; measures nothing)")
    add("--read-windows", type=int, default=None, help="windows per level and reader in the reads section (2000)")
    add("--cohort-sizes", type=int, nargs="+", default=None, help="slides per cohort run (default 100 1000 2000)")
    add("--cohort-slide-side", type=int, default=None, help="side of each cohort slide in px (default 1024)")
    add("--cohort-big-gpx", type=float, nargs="+", default=None,
        help="gigapixels of big slides whose planning, after-last-tile work and files are measured (default 0.1 1 15; "
        "0: none)")
    add("--instances-gpx", type=float, default=None,
        help="gigapixels of the instances section's synthetic class map (default 0.25; --quick 0.02)")
    return p.parse_args(argv)


def defaults(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    args.slide_size = args.slide_size or (2048 if quick else 12288)
    args.forward_seconds = args.forward_seconds or (3.0 if quick else 20.0)
    args.peer_size = args.peer_size or (512 if quick else 2048)
    args.memory_sizes = args.memory_sizes or ([0.01, 0.04] if quick else [0.1, 1.0, 4.0, 16.0])
    args.gpu_tiles = args.gpu_tiles or ([388] if quick else [388, 900, 1284, 1668, 2052])
    args.gpu_batches = args.gpu_batches or ([1, 2] if quick else [1, 4, 16])
    args.read_windows = args.read_windows or (100 if quick else 2000)
    args.cohort_sizes = args.cohort_sizes or ([4, 8] if quick else [100, 1000, 2000])
    args.cohort_slide_side = args.cohort_slide_side or (512 if quick else 1024)
    big = args.cohort_big_gpx if args.cohort_big_gpx is not None else ([] if quick else [0.1, 1.0, 15.0])
    args.cohort_big_gpx = [gpx for gpx in big if gpx > 0]
    args.instances_gpx = args.instances_gpx or (0.02 if quick else 0.25)
    return args


def run_section(name: str, args: argparse.Namespace, model, slide: Path) -> dict:
    workdir = args.workdir
    if name == "efficiency":
        from benchmarks import efficiency

        return efficiency.run(slide, model, workdir, tile_size=args.tile_size, batch_size=args.batch_size,
                              actors=args.actors, forward_seconds=args.forward_seconds, layouts=args.layouts,
                              amp=args.amp, reads=tuple(args.efficiency_reads), compile={"auto": "auto", "on": True, "off": False}[args.compile],
                              forward_tiles=args.forward_tiles)  # fmt: skip
    if name == "peer":
        from benchmarks import peer

        return peer.run(slide, args.model_path, workdir, size=args.peer_size, tile_size=args.tile_size,
                        batch_size=args.batch_size, amp=args.amp)  # fmt: skip
    if name == "memory":
        from benchmarks import memory

        return memory.run(workdir, args.memory_sizes, model_kind=args.memory_model, mosaic_base=args.mosaic_base,
                          tile_size=args.tile_size, batch_size=args.batch_size, default_model=args.model_path)  # fmt: skip
    if name == "tissue":
        from benchmarks import tissue_skip

        return tissue_skip.run(slide, model, workdir, tile_size=args.tile_size, batch_size=args.batch_size,
                               actors=args.actors, reuse=args.results.get("efficiency"))  # fmt: skip
    if name == "reads":
        from benchmarks import reads

        return reads.run(workdir, side=args.slide_size, tile_size=args.tile_size, halo=model.halo,
                         limit=args.read_windows)  # fmt: skip
    if name == "cpu":
        from benchmarks import cpu_modes
        from benchmarks.common import REPO
        from benchmarks.slides import synthetic_slide

        cmu = REPO.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
        return cpu_modes.run(model, synthetic_slide(workdir, 4096), cmu, seconds=args.forward_seconds)
    if name == "durability":
        from benchmarks import durability

        return durability.run(workdir, side=min(args.slide_size, 8192), tile_size=args.tile_size)
    if name == "instances":
        from benchmarks import instances

        return instances.run(workdir, gigapixels=args.instances_gpx)
    if name == "cohort":
        from benchmarks import cohort

        return cohort.run(workdir, args.cohort_sizes, slide_side=args.cohort_slide_side, model_kind=args.memory_model,
                          default_model=args.model_path, tile_size=args.tile_size, batch_size=args.batch_size,
                          big_gigapixels=args.cohort_big_gpx, mosaic_base=args.mosaic_base)  # fmt: skip
    from benchmarks import gpu

    return gpu.run(workdir, tiles=args.gpu_tiles, batches=args.gpu_batches, peak_tflops=args.peak_tflops,
                   slide_gpx=args.gpu_slide_gpx, mosaic_base=args.gpu_mosaic_base or args.mosaic_base,
                   quick=args.quick, real_slide=args.gpu_real_slide, bundled=args.model_path,
                   dry_run=args.gpu_dry_run, e2e_tile=args.gpu_e2e_tile)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = defaults(parse_args(argv))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    from benchmarks.common import machine, print_section, write_json
    from benchmarks.slides import synthetic_slide
    from unet import load_model

    args.workdir.mkdir(parents=True, exist_ok=True)
    args.model_path = args.model or Path(__file__).resolve().parents[1] / "models" / "nuclei-unet.pt"
    model = load_model(args.model_path)
    results: dict = {"machine": machine(), "argv": sys.argv[1:] if argv is None else argv, "sections": {}}
    args.results = results["sections"]
    print(f"machine: {results['machine']}")
    needs_slide = {"efficiency", "peer", "tissue"} & set(args.sections)
    slide = synthetic_slide(args.workdir, args.slide_size) if needs_slide else None
    for name in SECTIONS:
        if name not in args.sections:
            continue
        started = time.perf_counter()
        section = run_section(name, args, model, slide)
        section["section_seconds"] = round(time.perf_counter() - started, 1)
        results["sections"][name] = section
        print_section(TITLES[name], section)
        if "big_slides" in section:
            print_section(TITLES[name] + ": big slides", section["big_slides"])
        if "reads" in section:
            print_section(TITLES[name] + ": reads", section["reads"])
    path = write_json(results, args.json)
    print(f"\nresults: {path}")
    return results


if __name__ == "__main__":
    main()
