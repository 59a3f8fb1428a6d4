#!/usr/bin/env python
"""Train a U-Net with Ray Train (TorchTrainer): one CPU worker in-process up to N GPU workers, same code.

    python jobs/train_unet.py --data ../shared/data/nuclei --name nuclei --storage-path runs [options]
    python jobs/train_unet.py --preset nuclei            # the bundled models/nuclei-unet.pt recipe
    python jobs/train_unet.py --preset paper-isbi        # the paper's ISBI 2012 configuration

The run lives in STORAGE/NAME: Ray Train checkpoints, metrics.jsonl (one line per epoch) and best-model.pt
(the best epoch's model artifact; ``jobs/segment_slides.py --model STORAGE/NAME/best-model.pt`` takes it).
Rerunning the same command (same --name and --storage-path) resumes from the latest checkpoint; a larger
--epochs extends a finished run. The logic lives in ``pipeline.training``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from jobs import bundled_file, in_checkout  # noqa: E402

SHARED_DATA = Path(os.environ.get("WSI_TEST_DATA", REPO_ROOT.parent / "shared" / "data"))
NUCLEI_MPP = {"image0[1-7].*": 0.5, "image*": 0.25}  # 20x ~0.5 µm/px (image01-07), 40x ~0.25 µm/px (image08-15)

PRESETS: dict[str, dict] = {
    # Ronneberger et al. 2015 on ISBI 2012: 572 -> 388 tiles, batch 1, SGD momentum 0.99, weight map, elastic.
    "paper-isbi": dict(
        data=[str(SHARED_DATA / "isbi2012")], val_files=[f"{i:02d}" for i in range(25, 30)], base_channels=64, depth=4,
        padding="valid", optimizer="sgd", lr=0.01, momentum=0.99, batch_size=1, output_size=388, weight_map=True,
        elastic=True, stain_jitter=False, best_metric="val_rand_error", class_names=["membrane", "cell"],
        name="paper-isbi",
    ),
    # The bundled H&E nuclei model (models/nuclei-unet.pt): see models/README.md.
    # Instances: interior + a 1 px rim class; hard negatives from marked regions of a real slide; no image held
    # out (quality comes from jobs/cross_validate.py), so the last epoch is the model.
    "nuclei": dict(
        data=[str(SHARED_DATA / "nuclei")], val_split=0.0, mpp=0.5, image_mpp=NUCLEI_MPP,
        negatives=[[str(SHARED_DATA / "slides" / "cmu-1-small-region.svs"), str(bundled_file("hard-negatives.json"))]],
        base_channels=16, depth=3, optimizer="adam", lr=1e-3, lr_schedule="cosine", batch_size=4, output_size=132,
        weight_map=True, contact_weight=True, elastic=True, stain_jitter=True, boundary_width=1, scale_range=(0.8, 1.25),
        blur=1.5, jpeg=(40, 90), epochs=100, best_metric="epoch", class_names=["background", "nucleus", "nucleus boundary"],
        name="nuclei-unet",
    ),
}  # fmt: skip


DATA_OPTIONS = ("data", "val_data", "slide", "val_slide", "val_files", "negatives")  # what a user's own --data/--slide replaces


def _mpp_pair(text: str) -> tuple[str, float]:
    pattern, _, value = text.rpartition("=")
    try:
        return pattern, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GLOB=MPP (e.g. 'image1*=0.25'), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    from pipeline.training.config import METRIC_MODES, TrainConfig

    d = TrainConfig.__dataclass_fields__
    default = {name: f.default for name, f in d.items() if not callable(f.default_factory)}  # type: ignore[arg-type]
    p = argparse.ArgumentParser(
        prog="train_unet.py",
        description="Train a U-Net (Ronneberger et al. 2015) with Ray Train on image/label folders or whole slides, "
        "validate each epoch (pixel error, foreground Dice, ISBI Rand error), checkpoint, resume, and export the best "
        "model as an artifact for jobs/segment_slides.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named recipe (paper-isbi: the paper's ISBI 2012 setting; nuclei: the bundled "
                   "H&E model); any other option overrides it")  # fmt: skip

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", metavar="DIR", default=None,
                   help="folder of image/label pairs as DIR/images/NAME.ext and DIR/labels/NAME.ext (PNG/TIFF/JPEG; "
                   "paired by file stem); repeatable")  # fmt: skip
    g.add_argument("--val-data", action="append", metavar="DIR", default=None, help="folder used only for validation; repeatable")
    g.add_argument("--val-files", nargs="+", metavar="NAME", default=None,
                   help="hold out these --data images (file stems or globs, e.g. 25 26 or 'image0[39]')")  # fmt: skip
    g.add_argument("--val-split", type=float, default=default["val_split"],
                   help="fraction of --data images held out (seeded random) when no --val-files/--val-data/--val-slide")  # fmt: skip
    g.add_argument("--slide", nargs=2, action="append", metavar=("SLIDE", "LABELS"), default=None,
                   help="a whole slide (SVS/TIFF/Zarr/...) and its label mask (Zarr or PNG/TIFF, same size as the "
                   "level); patches are sampled around tissue; repeatable")  # fmt: skip
    g.add_argument("--val-slide", nargs=2, action="append", metavar=("SLIDE", "LABELS"), default=None,
                   help="slide held out for validation (--val-tiles-per-slide regions of --val-tile px); repeatable")  # fmt: skip
    g.add_argument("--negatives", nargs=2, action="append", metavar=("SLIDE", "REGIONS"), default=None,
                   help="hard negatives: a slide and a JSON of regions on it marked as holding no object (format: "
                   "models/hard-negatives.json); their 'train' regions are drawn as all-background patches; repeatable")  # fmt: skip
    g.add_argument("--negative-fraction", type=float, default=default["negative_fraction"],
                   help="share of the patches drawn from --negatives regions")  # fmt: skip
    g.add_argument("--slide-level", type=int, default=0, help="pyramid level of --slide/--val-slide to train on")
    g.add_argument("--val-tiles-per-slide", type=int, default=default["val_tiles_per_slide"], help="validation regions per --val-slide")
    g.add_argument("--label-mode", choices=("auto", "binary", "classes", "instances"), default="auto",
                   help="binary: nonzero = foreground; classes: value = class index; instances: 0 = background, "
                   "k = object k; auto: instances if >8-bit or >16 values, binary if <=1 foreground value, else classes")  # fmt: skip
    g.add_argument("--num-classes", type=int, default=None, help="classes (default: 2 for binary/instances, max label + 1 for classes)")
    g.add_argument("--boundary-width", type=int, default=default["boundary_width"],
                   help="instance labels: add a class for each object's rim of this many px, so the model separates "
                   "touching objects and the job writes instances (labels/nuclei); 0 = off")  # fmt: skip
    g.add_argument("--contact-width", type=int, default=default["contact_width"],
                   help="where objects touch, every object pixel within this many px of another object is boundary "
                   "too (a wider parting line between touching objects only); 0 = as wide as --boundary-width")  # fmt: skip
    g.add_argument("--core", type=float, default=default["core"],
                   help="instance labels: interior only where a pixel is at least this share of its object's largest "
                   "distance from the edge (its centre; the rest is boundary), so touching objects' seeds lie apart; 0 = off")  # fmt: skip
    g.add_argument("--mpp", type=float, default=None,
                   help="µm/px to train at and to record in the model; images with a known µm/px (--image-mpp) are "
                   "resampled to it")  # fmt: skip
    g.add_argument("--image-mpp", nargs="+", type=_mpp_pair, metavar="GLOB=MPP", default=None,
                   help="µm/px of image files by file-name glob, first match wins (e.g. 'image0[1-7]*=0.5' 'image*=0.25')")  # fmt: skip
    g.add_argument("--samples-per-epoch", type=int, default=None, help="patches per epoch (default: enough to cover the training images once)")

    g = p.add_argument_group("model")
    g.add_argument("--base-channels", type=int, default=default["base_channels"], help="channels of the first level (paper: 64)")
    g.add_argument("--depth", type=int, default=default["depth"], help="number of 2x2 poolings (paper: 4)")
    g.add_argument("--padding", choices=("valid", "same"), default="valid", help="valid = the paper's unpadded convolutions")
    g.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=False, help="batch norm after each convolution")
    g.add_argument("--up-mode", choices=("transpose", "bilinear"), default="transpose", help="up-sampling of the expanding path")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=default["epochs"], help="epochs in total (a resumed run continues up to this)")
    g.add_argument("--batch-size", type=int, default=default["batch_size"], help="patches per step per worker (paper: 1)")
    g.add_argument("--output-size", "--tile-size", dest="output_size", type=int, default=default["output_size"],
                   help="training patch output side O (rounded up to a valid size); the input is O + 2 * halo (paper: 388 -> 572)")  # fmt: skip
    g.add_argument("--optimizer", choices=("adam", "sgd"), default=default["optimizer"], help="paper: sgd with momentum 0.99")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: 1e-3 adam, 1e-2 sgd)")
    g.add_argument("--momentum", type=float, default=default["momentum"], help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=default["weight_decay"], help="L2 weight decay")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default=default["lr_schedule"], help="per-epoch learning-rate schedule")
    g.add_argument("--weight-map", action=argparse.BooleanOptionalAction, default=True,
                   help="border weights w0 * exp(-(d1 + d2)^2 / 2 sigma^2) between objects")  # fmt: skip
    g.add_argument("--class-balance", action=argparse.BooleanOptionalAction, default=True, help="class-frequency weights w_c")
    g.add_argument("--w0", type=float, default=default["w0"], help="border weight amplitude (paper: 10)")
    g.add_argument("--sigma", type=float, default=default["sigma"], help="border weight width in px (paper: 5)")
    g.add_argument("--contact-weight", action=argparse.BooleanOptionalAction, default=default["contact_weight"],
                   help="the border weight also on object pixels touching another object, where touching "
                   "instances part with no background between them")  # fmt: skip

    g = p.add_argument_group("augmentation")
    g.add_argument("--elastic", action=argparse.BooleanOptionalAction, default=False,
                   help="elastic deformation: N(0, --elastic-sigma) displacements on a --elastic-grid lattice, cubic interpolation")  # fmt: skip
    g.add_argument("--elastic-sigma", type=float, default=default["elastic_sigma"], help="displacement std in px (paper: 10)")
    g.add_argument("--elastic-grid", type=int, default=default["elastic_grid"], help="coarse lattice size (paper: 3)")
    g.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True, help="random flips and 90 degree rotations")
    g.add_argument("--stain-jitter", action=argparse.BooleanOptionalAction, default=False, help="H&E colour jitter in HED space (RGB data)")
    g.add_argument("--intensity-jitter", action=argparse.BooleanOptionalAction, default=True, help="brightness/contrast jitter")
    g.add_argument("--scale-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="zoom half the patches by a factor drawn log-uniformly in [LOW, HIGH] (e.g. 0.8 1.25: µm/px "
                   "metadata or objectives off by up to 25 %%)")  # fmt: skip
    g.add_argument("--blur", type=float, default=default["blur"], help="max Gaussian blur sigma in px for a quarter of the patches (0: off)")
    g.add_argument("--jpeg", type=int, nargs=2, metavar=("LOW", "HIGH"), default=None,
                   help="re-encode a quarter of the patches as JPEG at a quality in [LOW, HIGH]")  # fmt: skip

    g = p.add_argument_group("execution")
    g.add_argument("--num-workers", type=int, default=1,
                   help="Ray Train workers (DDP; one GPU each with --use-gpu); 0 = in-process local mode")  # fmt: skip
    g.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl); default CPU (gloo)")
    g.add_argument("--cpus-per-worker", type=int, default=default["cpus_per_worker"], help="CPUs reserved per worker (torch threads on CPU)")
    g.add_argument("--loader-workers", type=int, default=default["loader_workers"],
                   help="DataLoader processes per worker preparing patches ahead of the training step")  # fmt: skip
    g.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                   help="mixed precision: auto = bf16 on GPU, off on CPU; fp16 uses a GradScaler")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of the split, the patches and the initial weights")
    g.add_argument("--val-tile", type=int, default=default["val_tile"], help="output tile side when segmenting validation images")
    g.add_argument("--validate-every", type=int, default=default["validate_every"],
                   help="validate every N epochs and after the last (0: never); --best-metric epoch needs none")  # fmt: skip
    g.add_argument("--best-metric", choices=sorted(METRIC_MODES), default=default["best_metric"], help="what selects best-model.pt")
    g.add_argument("--max-steps-per-epoch", type=int, default=None, help="cap on steps per epoch (quick trials)")

    g = p.add_argument_group("run and outputs")
    g.add_argument("--name", default=None, help="run name; the same name and storage path resume the run (default: unet)")
    g.add_argument("--storage-path", default=str(REPO_ROOT / "runs" if in_checkout() else Path("runs")), help="folder holding the runs (shared storage for multi-node)")
    g.add_argument("--max-failures", type=int, default=0, help="restarts from the latest checkpoint after worker failures (-1: unlimited)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept per run (the latest ones)")
    g.add_argument("--export", metavar="PATH", default=None, help="also copy the best model artifact here at the end")
    g.add_argument("--class-names", nargs="+", default=None, help="class names stored in the model (default: background foreground)")
    g.add_argument("--address", default=None,
                   help="Ray cluster to join (default: $RAY_ADDRESS; if neither, start a local Ray on 127.0.0.1)")  # fmt: skip
    g.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started when no address is given (default: all)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    preset = dict(PRESETS[first.preset]) if first.preset else {}
    # The data options append: as defaults they would add to the preset's images; given, they replace them
    # (and the preset's held-out names, which name its own images).
    parser.set_defaults(**{key: value for key, value in preset.items() if key not in DATA_OPTIONS})
    args = parser.parse_args(argv)
    if not any(getattr(args, key) for key in ("data", "slide")):
        for key in DATA_OPTIONS:
            if getattr(args, key) is None and key in preset:
                setattr(args, key, list(preset[key]))
    if not args.data and not args.slide:
        parser.error("no training data: give --data DIR and/or --slide SLIDE LABELS (or a --preset)")
    # Ray workers run in another working directory: hand them absolute paths, checked here in the driver.
    absolute = lambda path: str(Path(path).expanduser().resolve())  # noqa: E731
    args.data = [absolute(p) for p in args.data or []]
    args.val_data = [absolute(p) for p in args.val_data or []]
    args.slide = [[absolute(p) for p in pair] for pair in args.slide or []]
    args.val_slide = [[absolute(p) for p in pair] for pair in args.val_slide or []]
    args.negatives = [[absolute(p) for p in pair] for pair in args.negatives or []]
    for path in args.data + args.val_data + [p for pair in args.slide + args.val_slide + args.negatives for p in pair]:
        if not Path(path).exists():
            parser.error(f"{path}: not found; check the path")
    args.storage_path = absolute(args.storage_path)
    if args.export:
        args.export = absolute(args.export)
    return args


def config_from_args(args: argparse.Namespace):
    from pipeline.training.config import TrainConfig

    image_mpp = args.image_mpp
    if isinstance(image_mpp, list):
        image_mpp = dict(image_mpp)
    return TrainConfig(
        data=list(args.data or []), val_data=list(args.val_data or []), val_files=list(args.val_files or []),
        val_split=args.val_split, slides=[list(s) for s in args.slide or []],
        val_slides=[list(s) for s in args.val_slide or []], negatives=[list(n) for n in args.negatives or []],
        negative_fraction=args.negative_fraction, boundary_width=args.boundary_width, contact_width=args.contact_width,
        core=args.core, slide_level=args.slide_level, val_tiles_per_slide=args.val_tiles_per_slide,
        label_mode=args.label_mode, num_classes=args.num_classes,
        mpp=args.mpp, image_mpp=image_mpp or {}, samples_per_epoch=args.samples_per_epoch,
        base_channels=args.base_channels, depth=args.depth, padding=args.padding, batch_norm=args.batch_norm,
        up_mode=args.up_mode, epochs=args.epochs, batch_size=args.batch_size, output_size=args.output_size,
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
        lr_schedule=args.lr_schedule, weight_map=args.weight_map, class_balance=args.class_balance, w0=args.w0,
        sigma=args.sigma, contact_weight=args.contact_weight, flips=args.flips, elastic=args.elastic, elastic_grid=args.elastic_grid,
        elastic_sigma=args.elastic_sigma, stain_jitter=args.stain_jitter, intensity_jitter=args.intensity_jitter,
        scale_range=tuple(args.scale_range) if args.scale_range else None, blur=args.blur,
        jpeg=tuple(args.jpeg) if args.jpeg else None,
        amp=args.amp, loader_workers=args.loader_workers, cpus_per_worker=args.cpus_per_worker, seed=args.seed,
        val_tile=args.val_tile, validate_every=args.validate_every, best_metric=args.best_metric, class_names=args.class_names,
        max_steps_per_epoch=args.max_steps_per_epoch,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipeline.training import fit, run_directory

    cfg = config_from_args(args)
    name = args.name or "unet"
    if args.num_workers > 0:
        from pipeline.inference.ray_setup import init_ray

        # log_to_driver: one line per epoch from the workers; the dashboard serves the state API Ray Train polls
        init_ray(args.address, args.num_cpus, repo_root=REPO_ROOT, log_to_driver=True, include_dashboard=True)
    started = time.perf_counter()
    result = fit(
        cfg, name, args.storage_path, num_workers=args.num_workers, use_gpu=args.use_gpu,
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, export=args.export,
    )  # fmt: skip
    metrics = dict(result.metrics or {})
    run_dir = run_directory(args.storage_path, name)
    summary = {"run": str(run_dir), "seconds": round(time.perf_counter() - started, 1), "last_epoch": metrics,
               "best_model": str(run_dir / "best-model.pt"), "export": args.export}  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    return summary


def run() -> None:
    """The console entry point (``wsi-train``) and ``python jobs/train_unet.py``: exit status 0 on success."""
    main()


if __name__ == "__main__":
    run()
