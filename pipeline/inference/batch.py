"""A cohort of slides end to end: stream them through one Ray actor pool, report each as it finishes.

This is what ``jobs/segment_slides.py`` runs; it is a library function so notebooks and other jobs get the
same behaviour. Slides are taken one by one as the run has room (:mod:`pipeline.inference.scheduler`): each
output is locked by this driver, planned in a CPU task, run shard by shard, finalized in a task and then
released, so 10 or 10,000 slides cost the driver the same. A bad slide fails alone with a one-line reason;
the run report gets a line per slide the moment it is final. Rerunning the same batch resumes: complete
outputs are kept for the cost of reading their metadata (no slide opened, no task), interrupted ones finish
their missing shards, outputs made with other settings are refused unless ``overwrite``.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.inference.engine import SegmentResult
from pipeline.inference.ray_runner import PACKAGE_ROOT, RayOptions
from pipeline.inference.ray_setup import init_ray
from pipeline.inference.report import RunReport, expand_slide_inputs, failed_result, name_slide, output_path_for
from pipeline.inference.scheduler import PlanRequest, Scheduler
from pipeline.slides.sources import SlideLimits
from pipeline.store.durability import durable_mkdir
from pipeline.store.locking import StoreLock, StoreLockedError
from pipeline.store.output_store import same_source, read_provenance
from pipeline.text import one_line

logger = logging.getLogger(__name__)


@dataclass
class BatchConfig:
    """Per-slide settings. ``level`` or ``target_mpp`` (µm/px) picks the resolution; neither: the model's
    training µm/px when it has one, else level 0. ``tissue_mask``: None, True (detect) or a mask image.
    ``resume`` (default): finish interrupted outputs made with the same settings and keep complete ones.
    ``shard_tiles``: tiles per shard side (None: shards of about 4096 pixels). ``slide_image``: the store's root
    image, "overview" (the slide's thumbnail) or "full" (the slide at the segmented level, every pixel)."""

    tile_size: int = 256
    level: int | None = None
    target_mpp: float | None = None
    probabilities: bool = False
    overwrite: bool = False
    resume: bool = True
    tissue_mask: Any = True
    previews: bool = True
    limits: SlideLimits = field(default_factory=SlideLimits)
    shard_tiles: int | None = None
    slide_image: str = "overview"

    def plan_settings(self, model: Any) -> dict[str, Any]:
        """``plan_slide``'s keyword arguments for every slide of the batch."""
        target_mpp = self.target_mpp
        if self.level is None and target_mpp is None:
            target_mpp = model.card.mpp  # run at the resolution the model was trained at
        return dict(
            tile_size=self.tile_size, level=self.level, target_mpp=target_mpp, require_mpp=self.target_mpp is not None,
            probabilities=self.probabilities, overwrite=self.overwrite, resume=self.resume,
            tissue_mask=self.tissue_mask, replace_other_slides=False, limits=self.limits, shard_tiles=self.shard_tiles,
            slide_image=self.slide_image,
        )  # fmt: skip


@dataclass
class BatchRun:
    results: list[SegmentResult]
    report: Path | None  # None when it could not be written (full or read-only disk)

    @property
    def failed(self) -> list[SegmentResult]:
        return [r for r in self.results if not r.ok]


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
    started, out_dir = time.time(), Path(out_dir)
    address = address or os.environ.get("RAY_ADDRESS") or None
    slides, problems = expand_slide_inputs(slide_inputs, exclude=out_dir)
    all_settings = {**asdict(config), **asdict(options), "ray_address": address or "local", "inputs": list(slide_inputs)}
    all_settings["tissue_mask"] = None if config.tissue_mask is None else str(config.tissue_mask)
    all_settings.update(settings or {})
    report = _open_report(out_dir, all_settings, started)
    results: list[SegmentResult] = []
    locks: dict[str, StoreLock] = {}

    def finished(result: SegmentResult) -> None:
        lock = locks.pop(result.output, None)
        if lock is not None:
            lock.release()
        if not result.ok:
            logger.error("%s", result.error)
        results.append(result)
        if report is not None:
            report.slide(result)

    for item, reason in problems:
        finished(failed_result(item, "-", reason, 0))
    try:
        durable_mkdir(out_dir)
        items = slide_items(slides, out_dir, model, config, locks)
    except OSError as error:  # the output folder cannot be created: every slide fails, nothing is written
        items = iter([failed_result(s, output_path_for(s, out_dir), f"output folder {out_dir}: {one_line(error)}")
                      for s in slides])  # fmt: skip
    try:
        _run_items(items, model, config, options, address, num_cpus, finished, len(slides))
    finally:
        for lock in locks.values():
            lock.release()
    order = {str(item): i for i, item in enumerate([item for item, _ in problems] + [str(s) for s in slides])}
    results.sort(key=lambda r: order.get(r.slide, len(order)))  # in the order of the inputs
    path = None
    if report is not None:
        try:
            path = report.finish(results, time.time())
        except OSError as error:
            logger.error("%s: cannot finish the run report (%s)", report.path, one_line(error))
    return BatchRun(results, path)


def _open_report(out_dir: Path, settings: dict[str, Any], started: float) -> RunReport | None:
    try:
        return RunReport(out_dir, settings, started)
    except OSError as error:  # full or read-only disk: the summary still reaches the user
        logger.error("%s: cannot write the run report (%s)", out_dir, one_line(error))
        return None


def _run_items(items: Iterator, model, config: BatchConfig, options: RayOptions, address: str | None,
               num_cpus: int | None, finished, total: int) -> None:  # fmt: skip
    """Pass on results that need no Ray; start Ray (once) at the first slide to plan and stream the rest."""
    for item in items:
        if not isinstance(item, PlanRequest):
            finished(item)
            continue
        try:
            init_ray(address, num_cpus, repo_root=PACKAGE_ROOT)
        except Exception as error:  # cannot join the cluster, ...: every slide left fails, the report is written
            reason = f"Ray: {one_line(error)}"
            for rest in [item, *items]:
                if isinstance(rest, PlanRequest):
                    rest = failed_result(rest.slide, rest.output, f"{rest.slide}: {reason}", config.level or 0)
                finished(rest)
            return
        scheduler = Scheduler(itertools.chain([item], items), model, options, finished,
                              probabilities=config.probabilities, tile_size=config.tile_size,
                              previews=config.previews, total=total)  # fmt: skip
        scheduler.run()
        return


def slide_items(slides: list[Path], out_dir: Path, model, config: BatchConfig,
                 locks: dict[str, StoreLock]) -> Iterator[PlanRequest | SegmentResult]:  # fmt: skip
    """Each slide, lazily: kept (complete with these settings), refused, or a plan request with its lock held."""
    settings = config.plan_settings(model)
    wanted = _kept_settings(model, config, settings)  # once per batch: the model's checksum, a mask file's hash
    owners: dict[Path, Path] = {}
    for slide in slides:
        output = output_path_for(slide, out_dir)
        if output in owners:
            reason = f"{slide}: its output {output} is also that of {owners[output]}; rename one or run them apart"
            yield failed_result(slide, output, reason, config.level or 0)
            continue
        owners[output] = slide
        kept = None if config.overwrite else kept_result(slide, output, wanted)
        if kept is not None:
            yield kept
            continue
        try:
            lock = StoreLock(output).acquire()
        except StoreLockedError as error:  # another live job writes this output
            yield failed_result(slide, output, name_slide(slide, one_line(error)), config.level or 0)
            continue
        except OSError as error:  # read-only or full disk, permissions
            reason = f"{slide}: cannot write its output in {out_dir} ({one_line(error)}); choose a writable --out"
            yield failed_result(slide, output, reason, config.level or 0)
            continue
        locks[str(output)] = lock
        yield PlanRequest(slide, output, settings, lock.token)


def _kept_settings(model, config: BatchConfig, settings: dict[str, Any]) -> dict[str, Any]:
    """What a complete store's provenance must say to be kept as it is (besides its source)."""
    from pipeline.slides.tissue_tiles import describe_tissue_option
    from unet.artifact import model_checksum

    wanted = {"model_checksum": model_checksum(model), "tile_size": config.tile_size,
              "probabilities": config.probabilities, "tissue": describe_tissue_option(config.tissue_mask),
              "requested": {"level": settings["level"], "target_mpp": settings["target_mpp"]}}  # fmt: skip
    if config.shard_tiles is not None:
        wanted["shard_tiles"] = config.shard_tiles
    return wanted


def kept_result(slide: Path, output: Path, wanted: dict[str, Any]) -> SegmentResult | None:
    """The result of an output already complete for this slide with the ``wanted`` settings, read from its
    metadata alone (no slide opened, no task): None when it must be planned (absent, unfinished, other
    settings: planning then resumes it or refuses it with its reason)."""
    existing = read_provenance(output)
    if not existing or existing.get("status") != "complete":
        return None
    if not same_source(existing, {"source": str(slide)}) or any(existing.get(k) != v for k, v in wanted.items()):
        return None
    return SegmentResult(
        slide=str(slide), output=str(output), shape=tuple(existing["shape"]), level=existing["level"],
        mpp=existing.get("mpp"), tiles_total=existing.get("tiles_segmented", 0) + existing.get("tiles_skipped", 0),
        tiles_run=0, tiles_skipped=existing.get("tiles_skipped", 0), seconds=0.0, kept=True,
        tiles_done_earlier=existing.get("tiles_segmented", 0),
    )  # fmt: skip
