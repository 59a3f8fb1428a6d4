"""Reports of :mod:`pipeline.training.crossval`: the JSON record, Markdown tables and failure pictures.

Why a record and not only a table: the model card quotes these numbers, so the JSON keeps what produced
them (command, machine, date, commit, model checksums) beside every per-image count, from which any
other summary can be recomputed.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.training.crossval import SCORES, EvalImage, ImageResult, ModelRun, methods_of, summarize

logger = logging.getLogger(__name__)

PANEL_WIDTH = 800  # px per panel at most in the failure pictures

REPO_ROOT = Path(__file__).resolve().parents[2]
SEEN_CAVEAT = ("evaluate-only: this model was trained on some of these images (seen_in_training = true), so its "
               "scores on them are optimistic; only the unseen ones, and the cross-validation folds, are held-out "
               "estimates")  # fmt: skip


def machine() -> dict:
    """Where and when the numbers were made."""
    import torch

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *args], check=False, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }  # fmt: skip


def build_report(mode: str, command: str, runs: list[ModelRun], results: list[ImageResult] | None = None,
                 hard_negatives: dict | None = None, settings: dict | None = None) -> dict:  # fmt: skip
    """Everything as one JSON-ready dict: per image, per model/fold, per group, overall. ``results``: the
    per-image results when there is no model (baselines only)."""
    results = results if results is not None else [r for run in runs for r in run.results]
    report = {
        "mode": mode, "command": command, "machine": machine(), "settings": settings or {},
        "metrics": {"dice": "foreground Dice (pixels, id > 0)", "f1": "object F1, one-to-one matches at IoU > 0.5",
                    "aji": "aggregated Jaccard index (Kumar et al. 2017)",
                    "mean": "mean of per-image scores", "pooled": "all images' counts summed, then the score"},
        "runs": [run.to_dict() for run in runs],
        "images": [r.to_dict() for r in results],
        "methods": list(methods_of(results)),
        "summary": summarize(results),
    }  # fmt: skip
    if any(r.seen_in_training for r in results):
        unseen = [r for r in results if r.seen_in_training is False]
        report["caveat"] = SEEN_CAVEAT
        report["summary_unseen_only"] = summarize(unseen) if unseen else None
    if hard_negatives is not None:
        report["hard_negatives"] = hard_negatives
    return report


def _cells(scores: dict, methods: tuple[str, ...]) -> str:
    return " | ".join(f"{scores[m][k]:.3f}" for m in methods for k in SCORES)


def markdown(report: dict) -> str:
    """Per-image table, then per-group and overall means (and pooled), model beside the baselines."""
    methods = tuple(report["methods"])
    header = " | ".join(f"{m} {k}" for m in methods for k in SCORES)
    rule = " | ".join("---" for _ in range(len(methods) * len(SCORES)))
    lines = [f"| image | group | fold | {header} |", f"| --- | --- | --- | {rule} |"]
    for row in report["images"]:
        seen = " (seen)" if row.get("seen_in_training") else ""
        fold = "-" if row["fold"] is None else row["fold"]
        lines.append(f"| {row['image']}{seen} | {row['group']} | {fold} | {_cells(row, methods)} |")
    lines += ["", f"| group | images | kind | {header} |", f"| --- | --- | --- | {rule} |"]
    summary = report["summary"]
    for name, block in [*summary["by_group"].items(), ("**all**", summary["overall"])]:
        for kind in ("mean", "pooled"):
            cells = _cells({m: block[m][kind] for m in methods}, methods)
            lines.append(f"| {name} | {block['images']} | {kind} | {cells} |")
    if report.get("caveat"):
        lines += ["", f"Caveat: {report['caveat']}."]
    hard = report.get("hard_negatives")
    if hard:
        lines += ["", "| nucleus fraction on non-nuclear regions | " + " | ".join(hard["models"]) + " |",
                  "| --- | " + " | ".join("---" for _ in hard["models"]) + " |"]  # fmt: skip
        for kind in sorted({k for s in hard["models"].values() for k in s["summary"]["by_kind"]}) + ["overall"]:
            values = [s["summary"]["overall"] if kind == "overall" else s["summary"]["by_kind"].get(kind, float("nan"))
                      for s in hard["models"].values()]  # fmt: skip
            lines.append(f"| {kind} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def _outlined(image: np.ndarray, ids: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    from skimage.segmentation import find_boundaries

    out = image.copy()
    out[find_boundaries(ids, mode="inner")] = colour
    return out


def failure_figures(results: list[ImageResult], images: dict[str, EvalImage], out_dir: str | Path, prefix: str,
                    count: int = 3, method: str = "model") -> list[Path]:  # fmt: skip
    """For the ``count`` images of lowest AJI: image | true outlines | predicted outlines, one PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    paths = []
    worst = sorted((r for r in results if method in r.maps), key=lambda r: r.scores[method].aji)[:count]
    for rank, result in enumerate(worst, 1):
        item, s = images[result.name], result.scores[method]
        panels = [(item.image, "image"), (_outlined(item.image, item.truth, (0, 255, 0)), "ground truth"),
                  (_outlined(item.image, result.maps[method], (255, 255, 0)), f"predicted ({method})")]  # fmt: skip
        height, width = item.image.shape[:2]
        scale = min(2.0, PANEL_WIDTH / width)  # 1-px outlines stay visible: about 2 screen px per image px
        fig, axes = plt.subplots(1, 3, figsize=(3 * width * scale / 100, height * scale / 100 + 0.6), dpi=100)
        for ax, (pixels, title) in zip(axes, panels):
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(title, fontsize=14)
            ax.axis("off")
        fold = "" if result.fold is None else f", fold {result.fold}"
        fig.suptitle(f"{result.name} ({result.group}{fold}): Dice {s.dice:.3f}, F1 {s.objects.f1:.3f}, AJI {s.aji:.3f}",
                     fontsize=16)  # fmt: skip
        fig.tight_layout()
        path = Path(out_dir) / f"{prefix}-worst-{rank}-{result.name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(report: dict, results: list[ImageResult], images: dict[str, EvalImage], out_dir: str | Path,
                  stem: str, figures: int = 3) -> dict[str, Path]:  # fmt: skip
    """``<stem>.json``, ``<stem>.md`` and the failure PNGs (of the model, if any) in ``out_dir``."""
    import json

    from pipeline.store.durability import atomic_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pictures = failure_figures(results, images, out_dir, stem, figures) if figures else []
    report["figures"] = [p.name for p in pictures]
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    with atomic_file(paths["json"]) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    with atomic_file(paths["markdown"]) as tmp:
        tmp.write_text(markdown(report) + "\n")
    logger.info("wrote %s, %s and %d figures", paths["json"], paths["markdown"], len(pictures))
    return paths
