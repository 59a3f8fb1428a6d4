"""A batch of slides end to end: plan each, run all on one Ray actor pool, report, preview.

This is what ``jobs/segment_slides.py`` runs; it is a library function so notebooks and other jobs
get the same behaviour: a bad slide fails alone with a one-line reason, the others finish, the run
report and a preview PNG per slide are written beside the outputs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.engine import SegmentResult, SlidePlan, plan_slide
from pipeline.ray_runner import RayOptions, one_line, segment_slides_ray
from pipeline.ray_setup import init_ray
from pipeline.report import expand_slide_inputs, failed_result, output_path_for, write_run_report
from pipeline.results import write_preview

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BatchConfig:
    """Per-slide settings. ``level`` or ``target_mpp`` (µm/px) picks the resolution; neither: the model's
    training µm/px when it has one, else level 0. ``tissue_mask``: None, True (detect) or a mask image."""

    tile_size: int = 256
    level: int | None = None
    target_mpp: float | None = None
    probabilities: bool = False
    overwrite: bool = False
    resume: bool = False
    tissue_mask: Any = True
    previews: bool = True


@dataclass
class BatchRun:
    results: list[SegmentResult]
    report: Path

    @property
    def failed(self) -> list[SegmentResult]:
        return [r for r in self.results if r.status != "complete"]


def plan_batch(slides: list[Path], out_dir: Path, model, config: BatchConfig) -> list[SlidePlan | SegmentResult]:
    """A SlidePlan per slide, or the failed SegmentResult of a slide that cannot start (one line each)."""
    target_mpp = config.target_mpp
    if config.level is None and target_mpp is None:
        target_mpp = getattr(model, "mpp", None)  # run at the resolution the model was trained at
    entries: list[SlidePlan | SegmentResult] = []
    owners: dict[Path, Path] = {}
    for slide in slides:
        output = output_path_for(slide, out_dir)
        if output in owners:
            reason = f"{slide}: its output {output} is also that of {owners[output]}; rename one or run them apart"
            entries.append(failed_result(slide, output, reason, config.level or 0))
            continue
        owners[output] = slide
        try:
            entries.append(plan_slide(
                slide, output, model, tile_size=config.tile_size, level=config.level, target_mpp=target_mpp,
                probabilities=config.probabilities, overwrite=config.overwrite, resume=config.resume,
                tissue_mask=config.tissue_mask,
            ))  # fmt: skip
        except Exception as error:  # missing, unopenable, output exists, wrong level or channels, ...
            entries.append(failed_result(slide, output, one_line(error), config.level or 0))
    return entries


def segment_batch(
    slide_inputs: list[str],
    out_dir: str | Path,
    model,
    config: BatchConfig | None = None,
    options: RayOptions | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    settings: dict[str, Any] | None = None,
) -> BatchRun:
    """Segment slides (files, directories, globs) into ``out_dir``/<stem>.zarr on Ray; never raises per slide."""
    config, options = config or BatchConfig(), options or RayOptions()
    started = time.time()
    out_dir = Path(out_dir)
    slides, problems = expand_slide_inputs(slide_inputs, exclude=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[SlidePlan | SegmentResult] = [failed_result(item, "-", reason, 0) for item, reason in problems]
    entries += plan_batch(slides, out_dir, model, config)
    for entry in entries:
        if not isinstance(entry, SlidePlan):
            reason = entry.status.removeprefix("failed: ")
            logger.error("%s", reason if str(entry.slide) in reason else f"{entry.slide}: {reason}")
    plans = [entry for entry in entries if isinstance(entry, SlidePlan)]
    address = address or os.environ.get("RAY_ADDRESS") or None
    done: Any = iter(())
    if plans:
        try:
            init_ray(address, num_cpus, repo_root=REPO_ROOT)
            done = iter(segment_slides_ray(plans, model, options))
        except Exception as error:  # cannot join the cluster, ...: every planned slide fails, report still written
            logger.error("Ray: %s", one_line(error))
            done = iter(plan.result(0, 0.0, f"failed: Ray: {one_line(error)}") for plan in plans)
    results = [next(done) if isinstance(entry, SlidePlan) else entry for entry in entries]
    if config.previews:
        for entry, result in zip(entries, results):
            if isinstance(entry, SlidePlan) and result.status == "complete":
                _preview(entry, Path(result.output))
    all_settings = {**asdict(config), **asdict(options), "ray_address": address or "local", "inputs": list(slide_inputs)}
    all_settings["tissue_mask"] = None if config.tissue_mask is None else str(config.tissue_mask)
    report = write_run_report(out_dir, results, {**all_settings, **(settings or {})}, started, time.time())
    return BatchRun(results, report)


def _preview(plan: SlidePlan, store: Path) -> None:
    try:
        write_preview(store, plan.slide, store.with_suffix(".png"))
    except Exception as error:  # a preview is a convenience: never fail a finished slide for it
        logger.warning("%s: no preview (%s)", store, one_line(error))
