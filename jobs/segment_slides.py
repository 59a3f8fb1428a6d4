#!/usr/bin/env python
"""Segment whole-slide images with a U-Net on Ray and write one OME-Zarr mosaic per slide.

    python jobs/segment_slides.py                      # demo: synthetic slide, bundled model, prints its Dice
    python jobs/segment_slides.py SLIDES|DIRS|GLOBS ... --out DIR [--model ARTIFACT] [options]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/segment_slides.py ...

Each slide gives DIR/<slide stem>.zarr; a per-slide table is printed and DIR/run-reports/<UTC time>-<pid>.jsonl written (a line per slide as it finishes).
A slide that cannot be found, opened, read or written is reported on one line and the others still run;
the exit status is 1 if any slide failed or the run report could not be written (2 for usage errors).
Rerunning the same command resumes where it stopped. The logic lives in ``pipeline``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from typing import Any  # noqa: E402

from jobs import bundled_file, in_checkout  # noqa: E402

DEFAULT_MODEL = bundled_file("nuclei-unet.pt")
DEMO_DIR = REPO_ROOT / "demo" if in_checkout() else Path("demo")
logger = logging.getLogger("segment_slides")


def usage_error(message: str) -> None:
    """Stop before any slide runs (bad model, options or --tissue-mask): message on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segment_slides.py",
        description="Segment whole-slide images with a U-Net on Ray (exact overlap-tile inference) and write "
        "one OME-Zarr mosaic per slide to DIR/<slide stem>.zarr, a summary table and a run report under DIR/run-reports/.",
    )
    add = parser.add_argument
    # fmt: off
    add("slides", nargs="*", metavar="SLIDES",
        help="slide files, directories (their .svs .tif .tiff .ndpi .mrxs .scn .vms .vmu .bif .svslide .zarr "
        "files, not recursive) or quoted glob patterns ('slides/**/*.svs')")
    add("--out", metavar="DIR",
        help="output folder (created if missing); required with slides (no slides: the demo, default demo/)")
    add("--model", metavar="ARTIFACT", default=None,
        help="model artifact written by unet.save_model "
        "(default: the bundled models/nuclei-unet.pt)")
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--level", type=int, default=None, metavar="N",
                            help="pyramid level to segment (default: the model's training µm/px if known, else 0)")
    resolution.add_argument("--mpp", type=float, default=None, metavar="X",
                            help="segment at X µm/px: the level closest at or below X, resampled when it is off "
                            "by more than 5%%; slides without µm/px metadata fall back to level 0 with a warning")
    add("--tile-size", type=int, default=256, metavar="T",
        help="output tile side in pixels, a multiple of the model's alignment 2**depth (default: %(default)s)")
    add("--shard-tiles", type=int, default=None, metavar="K",
        help="tiles per side of a shard, the unit of work and of writing: one file per shard and level (default: "
        "shards of about 4096 px, 16 tiles of 256)")
    add("--slide-image", choices=("overview", "full"), default="overview",
        help="the slide image at the store's root, under the masks in viewers: 'overview' (its thumbnail and halvings, "
        "a few MB) or 'full' (the segmented level pixel for pixel and its halvings: sharp when zoomed in, a "
        "compressed copy of the slide) (default: %(default)s)")
    add("--batch-size", type=int, default=4, metavar="B",
        help="tiles per forward pass on each actor; a window of 2 x 2 tiles counts 4 (default: %(default)s)")
    add("--forward-tiles", type=int, default=None, metavar="K",
        help="run blocks of K x K tiles as one forward window where the tiles to run fill them: less halo computed "
        "twice, the same output up to float rounding (default: as many as make 512 px, 2 for tiles of 256; 1 = "
        "every tile alone)")
    add("--actors", type=int, default=1, metavar="N",
        help="model actors, each holding one copy of the model (default: %(default)s)")
    add("--gpus-per-actor", type=float, default=0.0, metavar="G",
        help="GPUs per actor; 0 runs the actors on CPU, a fraction shares a GPU (default: %(default)s)")
    add("--cpus-per-actor", type=float, default=1.0, metavar="C",
        help="CPUs Ray reserves per actor (default: %(default)s)")
    add("--threads-per-actor", type=int, default=None, metavar="N",
        help="torch threads per CPU actor (default: the node's cores shared by its actors; 2 threads ran the job "
        "1.4x faster than 1 on a 2-core machine)")
    add("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
        help="precision, the same on CPU and GPU: auto = bf16 where the device has it natively (GPUs; CPUs with "
        "AVX-512 BF16 or AMX), float32 elsewhere; off = float32, the exact mode; bf16/fp16 = that (default: %(default)s)")
    add("--compile", nargs="?", const="on", choices=("auto", "on", "off"), default="off",
        help="torch.compile the model in each actor: on (also: --compile alone) = always; auto = on CPUs once a slide "
        "(or an actor's run) has 8192 tiles to run, so the compile (3-4 s, ~24 s the first time on a machine) is "
        "small beside the forward; off = never. The compiled forward is 1.2-1.5x the eager one alone, but not "
        "measurably faster end to end on a 2-core machine (docs/performance.md) (default: %(default)s)")
    add("--read-tasks", choices=("auto", "on", "off"), default="auto",
        help="read tile windows in CPU tasks of their own (on) or inside the model actors (off); auto = on for GPU "
        "actors, off for CPU actors, which then read beside their forward pass (default: %(default)s)")
    add("--verbose", action="store_true", help="debug messages, and Ray's own start-up lines")
    add("--log-file", metavar="FILE", default=None, help="also append every message (debug included) to FILE")
    add("--probabilities", action="store_true", help="also store per-class softmax probabilities (uint8, x255)")
    add("--overwrite", action="store_true",
        help="replace existing outputs of these slides (only theirs). Without it, rerunning a command resumes: "
        "complete outputs are kept, interrupted ones finish their missing tiles, and outputs made with other "
        "settings or another model are refused")
    add("--address", metavar="ADDR", default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS; if neither, start a local Ray on 127.0.0.1)")
    add("--num-cpus", type=int, default=None, metavar="N",
        help="CPUs of the local Ray started when no cluster address is given (default: all)")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--no-tissue-mask", action="store_true",
                      help="segment every tile (default: detect tissue and skip empty background tiles)")
    mask.add_argument("--tissue-mask", metavar="IMAGE", default=None,
                      help="use this boolean tissue mask image instead of detecting tissue (for a single slide)")
    add("--max-gigapixels", type=float, default=None, metavar="G",
        help="refuse slides larger than G gigapixels at the level to segment (default: $WSI_MAX_GIGAPIXELS or 64; "
        "the largest real slides are about 20)")
    add("--max-tiles", type=int, default=None, metavar="N",
        help="refuse slides cut into more than N tiles (default: $WSI_MAX_TILES or 1,000,000)")
    add("--no-progress", action="store_true", help="no per-slide progress bars")
    add("--no-preview", action="store_true", help="no DIR/<slide stem>.png preview (thumbnail with the mask)")
    # fmt: on
    return parser


def tissue_mask_option(args: argparse.Namespace) -> Any:
    """None (no masking), True (detect tissue) or the mask image path."""
    return None if args.no_tissue_mask else (args.tissue_mask or True)


def resolve_model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    if DEFAULT_MODEL.is_file():
        return DEFAULT_MODEL
    usage_error(f"no model given and no bundled model at {DEFAULT_MODEL}; pass --model ARTIFACT (a file written "
                "by unet.save_model)")  # fmt: skip


def options_from(args: argparse.Namespace, model: Any):
    from pipeline.inference.batch import BatchConfig
    from pipeline.slides.geometry import check_tile_size
    from pipeline.inference.ray_runner import RayOptions
    from pipeline.slides.sources import SlideLimits

    check_tile_size(args.tile_size, model.alignment)
    caps = {"max_gigapixels": args.max_gigapixels, "max_tiles": args.max_tiles}
    limits = SlideLimits(**{name: value for name, value in caps.items() if value is not None})
    if limits.max_gigapixels <= 0 or limits.max_tiles <= 0:
        raise ValueError(f"--max-gigapixels and --max-tiles must be positive, got {limits.max_gigapixels:g} and "
                         f"{limits.max_tiles}")  # fmt: skip
    config = BatchConfig(
        tile_size=args.tile_size, level=args.level, target_mpp=args.mpp, probabilities=args.probabilities,
        overwrite=args.overwrite, tissue_mask=tissue_mask_option(args),
        previews=not args.no_preview, limits=limits, shard_tiles=args.shard_tiles, slide_image=args.slide_image,
    )  # fmt: skip
    options = RayOptions(
        actors=args.actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size, amp=None if args.amp == "off" else args.amp,
        compile={"auto": "auto", "on": True, "off": False}[args.compile], forward_tiles=args.forward_tiles, threads_per_actor=args.threads_per_actor,
        progress=not args.no_progress, read_tasks={"auto": None, "on": True, "off": False}[args.read_tasks],
    )  # fmt: skip
    return config, options


def setup_logging(verbose: bool, log_file: str | None) -> None:
    """INFO on the terminal (DEBUG with --verbose, Ray's own start-up lines too); everything, DEBUG included,
    appended to ``log_file`` when given."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    handlers[0].setLevel(logging.DEBUG if verbose else logging.INFO)
    if log_file:
        handlers.append(logging.FileHandler(log_file))
        handlers[1].setLevel(logging.DEBUG)
    logging.basicConfig(level=logging.DEBUG if verbose or log_file else logging.INFO, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if log_file else
                        "%(levelname)s %(name)s: %(message)s")  # fmt: skip
    for noisy in ("urllib3", "matplotlib", "PIL", "asyncio", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose:
        os.environ["WSI_VERBOSE"] = "1"  # Ray's own start-up lines too (pipeline.inference.ray_setup)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log_file)
    from pipeline.inference.batch import segment_batch
    from pipeline.text import one_line
    from pipeline.inference.report import format_table
    from unet import load_model

    model_path = resolve_model_path(args)
    try:
        model = load_model(model_path)
        config, options = options_from(args, model)
    except (OSError, ValueError) as error:
        usage_error(one_line(error))
    try:
        if not args.slides:  # the README's main command: the demo slide, end to end, with its Dice
            from pipeline.demo.run import run_demo

            demo = run_demo(args.out or DEMO_DIR, model, options, num_cpus=args.num_cpus)
            run = demo.batch
        else:
            if not args.out:
                usage_error("--out DIR is required when slides are given")
            settings = {"model": str(model_path), "model_checksum": model.card.checksum}
            run = segment_batch(args.slides, args.out, model, config, options, address=args.address,
                                num_cpus=args.num_cpus, settings=settings)  # fmt: skip
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    print(format_table(run.results))
    print(f"run report: {run.report or 'not written (see the error above)'}")
    if not args.slides and demo.dice is not None:
        print(f"demo: Dice of the nuclei (every class but background) against the ground truth = {demo.dice:.3f} "
              f"(slide {demo.slide}, model {model_path.name})")  # fmt: skip
    if run.failed:
        print(f"{len(run.failed)} of {len(run.results)} slides failed", file=sys.stderr)
    if run.report is None:
        print("error: the run report could not be written (see above); the outputs' own status is still exact",
              file=sys.stderr)  # fmt: skip
    return 1 if run.failed or run.report is None else 0


def run() -> None:
    """The console entry point (``wsi-segment``) and ``python jobs/segment_slides.py``."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ray is shut down by main's finally; stores stay "running", never "complete"
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
