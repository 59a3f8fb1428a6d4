#!/usr/bin/env python
"""Leave-images-out cross-validation of the nuclei U-Net against classical baselines (Dice, object F1, AJI).

    python jobs/cross_validate.py --storage-path runs/cv --epochs 40 --num-workers 1 --cpus-per-worker 2 \\
        --loader-workers 1 --num-cpus 2                          # train + evaluate 3 folds (resumes, skips done ones)
    python jobs/cross_validate.py --evaluate-only models/nuclei-unet.pt   # one model on all 12 images ("before")
    python jobs/cross_validate.py --baselines-only                         # the classical baselines alone

Fold k holds out sorted stems[k::3] and trains ``train_unet.py --preset nuclei --val-files <held out>
--best-metric epoch --name cv-fold-k --storage-path STORAGE`` plus every option this script does not know
(e.g. --epochs, --num-workers, --use-gpu), which go to train_unet.py unchanged. Outputs in --out (default:
the storage path): <stem>.json (everything, with the command, machine and date), <stem>.md (the tables)
and <stem>-worst-N-IMAGE.png (the 3 held-out images of lowest model AJI). The logic lives in
``pipeline.training.crossval``.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "jobs")]

import argparse
import logging
import shlex
from collections.abc import Callable

from train_unet import NUCLEI_MPP, PRESETS, SHARED_DATA

from jobs import bundled_file  # noqa: E402

DEFAULT_HARD_NEGATIVES = bundled_file("hard-negatives.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cross_validate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Cross-validate the nuclei U-Net (leave-images-out folds) against classical baselines; unknown "
        "options are passed to jobs/train_unet.py for every fold.",
    )  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--evaluate-only", metavar="MODEL.pt", default=None,
                      help="evaluate this model on every image instead (it may have trained on some: marked)")  # fmt: skip
    mode.add_argument("--baselines-only", action="store_true", help="only the classical baselines on every image")
    mode.add_argument("--no-train", action="store_true", help="evaluate the fold runs that exist; never train")
    p.add_argument("--data", default=str(SHARED_DATA / "nuclei"), help="DIR/images and DIR/labels (the nuclei set)")
    p.add_argument("--storage-path", default=str(REPO_ROOT / "runs" / "cv"), help="where the cv-fold-K runs live")
    p.add_argument("--out", default=None, help="folder for the JSON, Markdown and PNGs (default: --storage-path)")
    p.add_argument("--folds", type=int, default=3,
                   help="number of folds (fold k holds out sorted stems[k::folds]: 4 images each of the 12, two 20x and two 40x)")
    p.add_argument("--fold", type=int, action="append", default=None, help="run only this fold; repeatable")
    p.add_argument("--device", default="auto", help="evaluation device: auto (cuda if present), cpu, cuda:N")
    p.add_argument("--tile-size", type=int, default=256, help="output tile side for evaluation")
    p.add_argument("--hard-negatives", default=str(DEFAULT_HARD_NEGATIVES),
                   help="JSON of marked non-nuclear slide regions (skipped when absent)")  # fmt: skip
    p.add_argument("--slides-dir", default=str(SHARED_DATA / "slides"), help="where the hard-negative slides are")
    p.add_argument("--figures", type=int, default=3, help="failure pictures of the worst images by AJI")
    return p


def requested_epochs(train_args: list[str]) -> int | None:
    """The --epochs the folds will train to (the user's, else the preset's), to tell finished runs from partial ones."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--epochs", type=int, default=None)
    epochs = parser.parse_known_args(train_args)[0].epochs
    if epochs is not None:
        return epochs
    from pipeline.training.config import TrainConfig

    return PRESETS["nuclei"].get("epochs", TrainConfig.__dataclass_fields__["epochs"].default)


def requested_recipe(train_args: list[str], storage_path: str) -> dict:
    """The recipe the folds' cards must record: the preset with the user's training options, as training parses them."""
    import train_unet

    from pipeline.training.crossval import Fold, fold_train_args
    from pipeline.training.loop import recipe_of

    return recipe_of(train_unet.config_from_args(train_unet.parse_args(fold_train_args(Fold(0, ("-",)), storage_path, train_args))))


def main(argv: list[str] | None = None, train: Callable[[list[str]], object] | None = None) -> dict:
    """Run, write and print; ``train`` replaces train_unet.main (tests)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, train_args = parser.parse_known_args(argv)
    if train_args and (args.evaluate_only or args.baselines_only or args.no_train):
        parser.error(f"unknown options {train_args} (training options apply only when folds are trained)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from pipeline.training import crossval
    from pipeline.training.cv_report import build_report, markdown, write_outputs

    out = Path(args.out or args.storage_path)
    runs, results = [], None
    if args.baselines_only:
        mode, stem = "baselines", "baselines"
        results = crossval.evaluate_images(None, crossval.load_eval_images(args.data, NUCLEI_MPP))
    elif args.evaluate_only:
        mode, stem = "evaluate-only", f"evaluate-{Path(args.evaluate_only).stem}"
        runs = [crossval.evaluate_file(args.evaluate_only, args.data, NUCLEI_MPP, args.tile_size, args.device)]
    else:
        mode, stem = "cross-validation", "cross-validation"
        if train is None and not args.no_train:
            import train_unet

            train = train_unet.main
        cv = crossval.CrossValidation(Path(args.data), NUCLEI_MPP, Path(args.storage_path), args.folds, args.tile_size,
                                      args.device, train_args, requested_recipe(train_args, args.storage_path))  # fmt: skip
        runs = cv.run(None if args.no_train else train, requested_epochs(train_args), args.fold)
    results = results if results is not None else [r for run in runs for r in run.results]

    hard = None
    if runs and Path(args.hard_negatives).is_file():
        from pipeline.training.hard_negatives import hard_negative_report

        models = {run.label: run.model for run in runs}
        device = crossval.resolve_device(args.device)
        hard = hard_negative_report(
            models, args.hard_negatives, args.slides_dir, tile_size=args.tile_size, device=device
        )
    elif runs:
        logging.getLogger("cross_validate").warning("%s not found: no false-positive check", args.hard_negatives)

    command = shlex.join(["python", "jobs/cross_validate.py", *argv])
    settings = {"data": str(Path(args.data).resolve()), "eval_mpp": crossval.EVAL_MPP, "image_mpp": NUCLEI_MPP,
                "folds": args.folds, "tile_size": args.tile_size, "amp": None, "train_args": train_args}  # fmt: skip
    report = build_report(mode, command, runs, results, hard, settings)
    images = {i.name: i for i in crossval.load_eval_images(args.data, NUCLEI_MPP, [r.name for r in results])}
    paths = write_outputs(report, results, images, out, stem, args.figures if runs else 0)
    print(markdown(report))
    print(f"\nwrote {paths['json']} and {paths['markdown']}")
    return report


if __name__ == "__main__":
    main()
