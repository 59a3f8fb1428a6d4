"""A batch of slides end to end: plan each, run all on one Ray actor pool, report, preview.

This is what ``jobs/segment_slides.py`` runs; it is a library function so notebooks and other jobs
get the same behaviour: a bad slide fails alone with a one-line reason, the others finish, the run
report and a preview PNG per slide are written beside the outputs. Rerunning the same batch resumes:
complete outputs are kept, interrupted ones finish their missing tiles, outputs made with other
settings are refused unless ``overwrite``. Each output is locked for the run, so two jobs never write it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.store.durability import durable_mkdir
from pipeline.inference.engine import SegmentResult, SlidePlan, plan_slide
from pipeline.store.locking import StoreLock, StoreLockedError
from pipeline.inference.ray_runner import RayOptions, segment_slides_ray
from pipeline.text import one_line
from pipeline.inference.ray_setup import init_ray
from pipeline.inference.report import expand_slide_inputs, failed_result, output_path_for, write_run_report
from pipeline.store.results import write_preview
from pipeline.slides.sources import SlideLimits

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class BatchConfig:
    """Per-slide settings. ``level`` or ``target_mpp`` (µm/px) picks the resolution; neither: the model's
    training µm/px when it has one, else level 0. ``tissue_mask``: None, True (detect) or a mask image.
    ``resume`` (default): finish interrupted outputs made with the same settings and keep complete ones."""

    tile_size: int = 256
    level: int | None = None
    target_mpp: float | None = None
    probabilities: bool = False
    overwrite: bool = False
    resume: bool = True
    tissue_mask: Any = True
    previews: bool = True
    limits: SlideLimits = field(default_factory=SlideLimits)


@dataclass
class BatchRun:
    results: list[SegmentResult]
    report: Path | None  # None when it could not be written (full or read-only disk)

    @property
    def failed(self) -> list[SegmentResult]:
        return [r for r in self.results if not r.ok]


@dataclass
class BatchPlan:
    """The slides that can run (each planned, its output locked) and those that cannot (failed, one line each)."""

    plans: list[SlidePlan] = field(default_factory=list)
    failures: list[SegmentResult] = field(default_factory=list)


def plan_batch(
    slides: list[Path], out_dir: Path, model, config: BatchConfig, locks: contextlib.ExitStack
) -> BatchPlan:
    """Plan each slide, its output locked in ``locks``; a slide that cannot start is a failure with its reason."""
    target_mpp = config.target_mpp
    if config.level is None and target_mpp is None:
        target_mpp = model.card.mpp  # run at the resolution the model was trained at
    batch = BatchPlan()
    owners: dict[Path, Path] = {}
    for slide in slides:
        output = output_path_for(slide, out_dir)
        if output in owners:
            reason = f"{slide}: its output {output} is also that of {owners[output]}; rename one or run them apart"
            batch.failures.append(failed_result(slide, output, reason, config.level or 0))
            continue
        owners[output] = slide
        try:
            lock = StoreLock(output).acquire()
        except StoreLockedError as error:  # another live job writes this output
            batch.failures.append(failed_result(slide, output, _name_slide(slide, one_line(error)), config.level or 0))
            continue
        except OSError as error:  # read-only or full disk, permissions
            reason = f"{slide}: cannot write its output in {out_dir} ({one_line(error)}); choose a writable --out"
            batch.failures.append(failed_result(slide, output, reason, config.level or 0))
            continue
        try:
            batch.plans.append(plan_slide(
                slide, output, model, tile_size=config.tile_size, level=config.level, target_mpp=target_mpp,
                require_mpp=config.target_mpp is not None, probabilities=config.probabilities,
                overwrite=config.overwrite, resume=config.resume, tissue_mask=config.tissue_mask,
                replace_other_slides=False, limits=config.limits, lock_token=lock.token,
            ))  # fmt: skip
            locks.callback(lock.release)
        except Exception as error:  # missing, unopenable, output exists, wrong level or channels, ...
            lock.release()
            batch.failures.append(failed_result(slide, output, _name_slide(slide, one_line(error)), config.level or 0))
    return batch


def _name_slide(slide: Path, reason: str) -> str:
    """Every failure line names its file (some library errors name only the output or nothing)."""
    return reason if str(slide) in reason or slide.name in reason else f"{slide}: {reason}"


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
    address = address or os.environ.get("RAY_ADDRESS") or None
    slides, problems = expand_slide_inputs(slide_inputs, exclude=out_dir)
    batch = BatchPlan(failures=[failed_result(item, "-", reason, 0) for item, reason in problems])
    with contextlib.ExitStack() as locks:
        try:
            durable_mkdir(out_dir)
            planned = plan_batch(slides, out_dir, model, config, locks)
            batch.plans, batch.failures = planned.plans, batch.failures + planned.failures
        except OSError as error:  # the output folder cannot be created: every slide fails, nothing is written
            batch.failures += [failed_result(s, output_path_for(s, out_dir), f"output folder {out_dir}: {one_line(error)}")
                               for s in slides]  # fmt: skip
        for failure in batch.failures:
            logger.error("%s", failure.error)
        ran = _run_plans(batch.plans, model, options, address, num_cpus)
        if config.previews:
            for plan, result in zip(batch.plans, ran):
                if result.ok and _wants_preview(result):
                    _preview(plan, Path(result.output))
    order = {str(item): i for i, item in enumerate([item for item, _ in problems] + [str(s) for s in slides])}
    # results in the order of the inputs: those naming no slide first, then each slide
    results = sorted(batch.failures + ran, key=lambda r: order.get(r.slide, len(order)))
    all_settings = {**asdict(config), **asdict(options), "ray_address": address or "local", "inputs": list(slide_inputs)}
    all_settings["tissue_mask"] = None if config.tissue_mask is None else str(config.tissue_mask)
    try:
        report = write_run_report(out_dir, results, {**all_settings, **(settings or {})}, started, time.time())
    except OSError as error:  # full or read-only disk: the summary still reaches the user
        logger.error("%s: cannot write the run report (%s)", out_dir, one_line(error))
        report = None
    return BatchRun(results, report)


def _run_plans(plans: list[SlidePlan], model, options: RayOptions, address: str | None,
               num_cpus: int | None) -> list[SegmentResult]:  # fmt: skip
    """One result per plan, in order: the planned slides run on one Ray actor pool."""
    if not plans:
        return []
    try:
        if any(plan.tiles for plan in plans):  # complete or all-background outputs need no Ray at all
            init_ray(address, num_cpus, repo_root=REPO_ROOT)
        return segment_slides_ray(plans, model, options)
    except Exception as error:  # cannot join the cluster, ...: every planned slide fails, report still written
        logger.error("Ray: %s", one_line(error))
        return [plan.result(0, 0.0, f"Ray: {one_line(error)}") for plan in plans]


def _wants_preview(result: SegmentResult) -> bool:
    """A new or changed result gets a preview; a complete one kept from an earlier run keeps its own."""
    return not (result.kept and Path(result.output).with_suffix(".png").exists())


def _preview(plan: SlidePlan, store: Path) -> None:
    try:
        write_preview(store, plan.slide, store.with_suffix(".png"))
    except Exception as error:  # a preview is a convenience: never fail a finished slide for it
        logger.warning("%s: no preview (%s)", store, one_line(error))
