"""False-positive nucleus area on marked non-nuclear regions of real slides (keratin, stroma, debris, ...).

Why: Dice/F1/AJI on the annotated tiles say little about what a model calls a nucleus elsewhere on a
slide; a region known to hold no nucleus measures that directly. Each region is segmented with its real
surroundings (the tiles around it are read from the slide, exactly as a whole-slide run reads them), at
the model's µm/px, and scored by the fraction of its area predicted as nucleus (class > 0).

File format (``models/hard-negatives.json``): one slide entry or a list of them::

    {"slide": "cmu-1-small-region.svs", "mpp": 0.499,
     "regions": [{"name": "keratin-1", "kind": "keratin", "box": [y0, x0, y1, x1], "split": "eval"}, ...]}

``box`` is in level-0 pixels of ``<slides_dir>/<slide>``; ``mpp`` (optional) overrides the slide's level-0
µm/px; only regions whose ``split`` is ``eval`` are scored (the others may train a model).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.training.baseline import BASELINES
from pipeline.training.evaluate import predict_region

logger = logging.getLogger(__name__)

BASELINE_CONTEXT = 256  # px of surroundings a baseline sees on each side (its Otsu threshold is per image)


@dataclass(frozen=True)
class Region:
    name: str
    kind: str
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 in level-0 pixels
    split: str = "eval"


@dataclass(frozen=True)
class SlideRegions:
    slide: Path
    mpp: float | None
    regions: tuple[Region, ...]


def load_hard_negatives(path: str | Path, slides_dir: str | Path) -> list[SlideRegions]:
    """The slide entries of a hard-negatives file, slide paths resolved against ``slides_dir``."""
    data = json.loads(Path(path).read_text())
    entries = data if isinstance(data, list) else [data]
    out = []
    for entry in entries:
        regions = []
        for r in entry["regions"]:
            y0, x0, y1, x1 = (int(v) for v in r["box"])
            if y1 <= y0 or x1 <= x0:
                raise ValueError(f"{path}: region {r['name']!r} has an empty box {r['box']}")
            regions.append(
                Region(str(r["name"]), str(r.get("kind", "")), (y0, x0, y1, x1), str(r.get("split", "eval")))
            )
        mpp = entry.get("mpp")
        out.append(SlideRegions(Path(slides_dir) / entry["slide"], None if mpp is None else float(mpp), tuple(regions)))
    return out


def _view_box(view, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """A level-0 box as (y0, x0, height, width) on ``view``, the pixels it touches, clipped to the view."""
    d = view.level0_downsample
    y0, x0 = max(0, math.floor(box[0] / d)), max(0, math.floor(box[1] / d))
    y1, x1 = min(view.size[0], math.ceil(box[2] / d)), min(view.size[1], math.ceil(box[3] / d))
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"{getattr(view, 'path', None) or view.name}: box {box} lies outside the slide")
    return y0, x0, y1 - y0, x1 - x0


def _open(entry: SlideRegions, mpp: float | None):
    from pipeline.slides.resolution import open_for_segmentation

    return open_for_segmentation(str(entry.slide), target_mpp=mpp, mpp=entry.mpp)


def model_fractions(model: torch.nn.Module, entries: list[SlideRegions], split: str = "eval", tile_size: int = 256,
                    device: str = "cpu") -> list[dict]:  # fmt: skip
    """Per region: the fraction of its area the model predicts as nucleus (float32, the inference tiling)."""
    rows = []
    model.eval()
    for entry in entries:
        view = _open(entry, model.card.mpp)
        for region in (r for r in entry.regions if r.split == split):
            box = _view_box(view, region.box)
            classes = predict_region(model, view, box, tile_size, 4, device, None, False).argmax(0)
            rows.append(_row(entry, region, box, float((classes > 0).mean())))
    return rows


def baseline_fractions(entries: list[SlideRegions], split: str = "eval", mpp: float = 0.5) -> dict[str, list[dict]]:
    """The same fractions for each baseline, run on the region plus :data:`BASELINE_CONTEXT` px around it."""
    out: dict[str, list[dict]] = {name: [] for name in BASELINES}
    for entry in entries:
        view = _open(entry, mpp)
        for region in (r for r in entry.regions if r.split == split):
            y0, x0, h, w = box = _view_box(view, region.box)
            wy0, wx0 = max(0, y0 - BASELINE_CONTEXT), max(0, x0 - BASELINE_CONTEXT)
            wy1, wx1 = min(view.size[0], y0 + h + BASELINE_CONTEXT), min(view.size[1], x0 + w + BASELINE_CONTEXT)
            window = view.read(wy0, wy1, wx0, wx1)
            for name, baseline in BASELINES.items():
                mask = baseline(window)[0][y0 - wy0 : y0 - wy0 + h, x0 - wx0 : x0 - wx0 + w]
                out[name].append(_row(entry, region, box, float(mask.mean())))
    return out


def _row(entry: SlideRegions, region: Region, box: tuple[int, int, int, int], fraction: float) -> dict:
    return {"slide": entry.slide.name, "region": region.name, "kind": region.kind, "box_level0": list(region.box),
            "pixels": box[2] * box[3], "nucleus_fraction": fraction}  # fmt: skip


def summarize_fractions(rows: list[dict]) -> dict:
    """Area-weighted nucleus fraction per region kind and over all regions."""

    def weighted(selected: list[dict]) -> float:
        pixels = sum(r["pixels"] for r in selected)
        return sum(r["nucleus_fraction"] * r["pixels"] for r in selected) / pixels if pixels else float("nan")

    kinds = sorted({r["kind"] for r in rows})
    return {"by_kind": {k: weighted([r for r in rows if r["kind"] == k]) for k in kinds}, "overall": weighted(rows)}


def hard_negative_report(models: dict[str, torch.nn.Module], path: str | Path, slides_dir: str | Path,
                         split: str = "eval", tile_size: int = 256, device: str = "cpu") -> dict:  # fmt: skip
    """Nucleus fractions of every model (by label) and of the baselines on the ``split`` regions of ``path``."""
    entries = load_hard_negatives(path, slides_dir)
    rows = {label: model_fractions(model, entries, split, tile_size, device) for label, model in models.items()}
    rows.update(baseline_fractions(entries, split))
    if not any(rows.values()):
        logger.warning("%s: no region with split %r", path, split)
    return {
        "file": str(path),
        "split": split,
        "models": {label: {"regions": r, "summary": summarize_fractions(r)} for label, r in rows.items()},
    }
