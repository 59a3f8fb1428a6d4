#!/usr/bin/env python
"""Reproduce the U-Net paper's ISBI 2012 setting: train on slices 00-24, report pixel and Rand error on 25-29.

    python jobs/reproduce_isbi.py                                   # the paper's configuration (GPU-sized)
    python jobs/reproduce_isbi.py --epochs 8 --base-channels 16     # a short CPU version
    python jobs/reproduce_isbi.py --use-gpu --epochs 200            # on a GPU machine

It is ``jobs/train_unet.py --preset paper-isbi`` (1 input channel, 64 base channels, depth 4, valid padding,
572 -> 388 tiles, batch 1, SGD momentum 0.99, weighted cross-entropy with the border weight map w0 = 10,
sigma = 5, elastic deformation on a 3 x 3 grid with sigma 10 px, flips/rotations) plus a final evaluation of
the run's best model on slices 25-29, segmented whole with the inference tiling. Every other option of
train_unet.py is accepted and overrides the preset (``--name``, ``--storage-path``, ``--num-workers``, ...).
Rerunning the same command resumes the run. The evaluation is printed next to the paper's figures (which
are on the challenge's hidden test set, so they are a reference, not the same test) and written to
STORAGE/NAME/isbi-report.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "jobs"))

import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

PAPER = {"pixel_error": 0.0611, "rand_error": 0.0382, "warping_error": 0.000353}
TEST_SLICES = [f"{i:02d}" for i in range(25, 30)]


def evaluate_isbi(model_path: Path, data_dir: Path, tile: int = 256) -> dict:
    """Pixel error, foreground Dice and Rand error of the model on slices 25-29 (whole slices, mirrored at
    their borders exactly as inference does), summed over the five slices (Rand error: their mean)."""
    from unet import load_model
    from pipeline.training.evaluate import ValItem, evaluate
    from pipeline.training.files import read_image, read_label

    model = load_model(model_path)
    items = []
    for name in TEST_SLICES:
        image, label = read_image(data_dir / "images" / f"{name}.png"), read_label(data_dir / "labels" / f"{name}.png")
        items.append(ValItem(name, image, label, (0, 0, *image.shape[:2])))
    totals = evaluate(model, items, "binary", tile_size=tile)
    return {k: round(v, 5) for k, v in totals.summary().items()}


def main(argv: list[str] | None = None) -> dict:
    import train_unet

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        train_unet.build_parser().print_help()
        return {}
    args = train_unet.parse_args(["--preset", "paper-isbi", *argv])
    started = time.perf_counter()
    summary = train_unet.main(["--preset", "paper-isbi", *argv])
    seconds = time.perf_counter() - started
    run_dir = Path(summary["run"])
    data_dir = Path(args.data[0])
    measured = evaluate_isbi(run_dir / "best-model.pt", data_dir, args.val_tile)
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    report = {
        "command": "python jobs/reproduce_isbi.py " + " ".join(argv),
        "slices_train": "00-24",
        "slices_test": "25-29",
        "measured_on_25_29": measured,
        "paper_on_challenge_test_set": PAPER,
        "epochs_completed": len(history),
        "best_epoch": history[-1].get("best_epoch") if history else None,
        "training_seconds_this_invocation": round(seconds, 1),
        "training_seconds_all_epochs": round(sum(r.get("epoch_seconds", 0) for r in history), 1),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPU cores, "
        + ("GPU" if args.use_gpu else "no GPU"),
        "config": {k: getattr(args, k) for k in ("base_channels", "depth", "optimizer", "lr", "momentum", "batch_size",
                                                 "output_size", "weight_map", "w0", "sigma", "elastic", "epochs")},
    }  # fmt: skip
    (run_dir / "isbi-report.json").write_text(json.dumps(report, indent=2))
    print("\nISBI 2012, slices 25-29 (trained on 00-24)")
    print(f"{'':14}{'measured':>10}{'paper*':>10}")
    for key in ("pixel_error", "rand_error"):
        print(f"{key:14}{measured[key]:>10.4f}{PAPER[key]:>10.4f}")
    print(f"{'dice':14}{measured['dice']:>10.4f}{'':>10}")
    print("* the paper's figures are on the challenge's hidden test set")
    print(f"report: {run_dir / 'isbi-report.json'}")
    return report


if __name__ == "__main__":
    main()
