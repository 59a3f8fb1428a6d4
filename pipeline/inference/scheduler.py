"""The driver of a Ray run: slides stream through a bounded window, their shards share one pool of actors.

The driver never holds the cohort. It pulls slides from an iterator (paths to plan, ready plans, or
failures to pass on) only while fewer than ``RayOptions.slides_ahead`` are planning or running; each is
planned in a CPU task on the cluster, its shards are run by the model actors, and the moment its last
shard is written a finalize task builds its pyramid and marks it complete, and the slide is released. So
the first tile runs within seconds of the start whatever the cohort's size, and the driver's memory
depends on the slides in flight, not on how many slides or tiles the cohort has.

Policy across slides: the next free actor slot takes the next shard of the *oldest* slide in flight that
still has shards, but no slide may hold more than half of the slots while a younger slide waits for one.
Oldest-first finishes slides in the order they came (each slide's result, report line and memory are
released early); the half cap keeps a giant slide from starving the small ones behind it, which then
finish while the giant one keeps half the pool busy.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pipeline.inference.engine import SegmentResult, SlidePlan
from pipeline.inference.ray_runner import ModelInStore, RayOptions, actor_threads, ray_pieces, without_shards
from pipeline.inference.tile_batches import ShardOutcome
from pipeline.slides.geometry import Shard
from pipeline.text import one_line

logger = logging.getLogger(__name__)


@dataclass
class PlanRequest:
    """A slide to plan in a task: its path, its store, ``plan_slide``'s keyword settings and the driver's lock."""

    slide: Path
    output: Path
    settings: dict[str, Any]
    lock_token: str | None = None


@dataclass
class SlideRun:
    """One slide in flight: its plan, shards not yet started, shards running, and what came back."""

    plan: SlidePlan
    started: float
    queue: deque = field(default_factory=deque)
    task_plan: Any = None  # the plan without its shards, in the object store once: every task of the slide gets it
    running: int = 0
    tiles: int = 0
    model_seconds: float = 0.0
    error: str | None = None

    @property
    def finished_running(self) -> bool:
        return self.running == 0 and (not self.queue or self.error is not None)


class Scheduler:
    """Runs the items of one Ray run; ``on_result`` gets each slide's :class:`SegmentResult` as it is final."""

    def __init__(self, items: Iterable[SlidePlan | PlanRequest | SegmentResult], model: Any, options: RayOptions,
                 on_result: Callable[[SegmentResult], None], *, probabilities: bool, tile_size: int,
                 previews: bool = False, total: int | None = None) -> None:  # fmt: skip
        import ray

        self.items: Iterator = iter(items)
        self.options, self.on_result, self.previews = options, on_result, previews
        self.pieces = ray_pieces(options)
        self.model_ref = ray.put(model)
        self.actor_args = (tile_size, options.device, options.amp, probabilities, options.compile, options.batch_size,
                           actor_threads(options), options.forward_tiles)  # fmt: skip
        self.actors: list = []
        self.actor_load = [0] * options.actors
        self.slots = options.actors * 2  # shards in flight: each actor has one running and one ready
        self.slides: dict[int, SlideRun] = {}  # in order of arrival (dicts keep it)
        self.waiting: dict[Any, tuple] = {}  # ObjectRef -> what it is
        self.planning, self.next_id, self.exhausted = 0, 0, False
        self.progress = _CohortProgress(options.progress, total)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Until every item has its result. An error of the run itself (no CPU left for tasks, an actor that
        cannot start, a lost cluster) fails every slide not yet final, each with that one line."""
        try:
            self._loop()
        except Exception as error:
            reason = one_line(error)
            logger.error("Ray run failed: %s", reason)
            self._fail_all(reason)
        finally:
            self.progress.close()

    def _fail_all(self, reason: str) -> None:
        for slide_id in list(self.slides):
            run = self.slides.pop(slide_id)
            untouched = sum(len(shard.tiles) for shard in run.queue)
            run.error = f"{reason} ({untouched} tiles not run)" if untouched else reason
            self._complete(run)
        for kind, *what in self.waiting.values():
            if kind == "plan":
                self._report(_plan_failure(what[0], reason))
        self.waiting.clear()
        for item in self.items:
            if isinstance(item, PlanRequest):
                item = _plan_failure(item, reason)
            elif isinstance(item, SlidePlan):
                item = item.result(0, 0.0, reason)
            self._report(item)

    def _loop(self) -> None:
        import ray

        from pipeline.inference.ray_runner import check_cpus_left

        check_cpus_left(self.options)
        self.model_box = ModelInStore(self.model_ref)
        self.actors = [self.pieces["actor"].remote(*self.actor_args) for _ in range(self.options.actors)]
        for actor in self.actors:
            actor.load.remote(self.model_box)  # fetch the model now, while the first slides are planned
        while True:
            self._pull_items()
            self._dispatch()
            if not self.waiting:
                if self.exhausted and not self.slides:
                    return
                if self.exhausted:
                    raise RuntimeError(f"{len(self.slides)} slides neither running nor finishing (a bug)")
                continue
            ready, _ = ray.wait(list(self.waiting), num_returns=1)
            self._handle(ready[0])

    def _pull_items(self) -> None:
        while not self.exhausted and self.planning + len(self.slides) < self.options.slides_ahead:
            item = next(self.items, None)
            if item is None:
                self.exhausted = True
            elif isinstance(item, SegmentResult):  # failed before it could be planned (reported by the caller)
                self._report(item)
            elif isinstance(item, PlanRequest):
                ref = self.pieces["plan"].remote(item, self.model_ref)
                self.waiting[ref] = ("plan", item, time.perf_counter())
                self.planning += 1
            else:
                self._start(item, time.perf_counter())

    def _start(self, plan: SlidePlan, started: float) -> None:
        import ray

        run = SlideRun(plan, started, deque(plan.shards), ray.put(without_shards(plan)))
        self.slides[self.next_id] = run
        self.next_id += 1
        self.progress.slide_started(plan)
        self._maybe_finish(self.next_id - 1)

    def _dispatch(self) -> None:
        """Fill free slots: oldest slide first, at most half the slots per slide while another waits."""
        in_flight = sum(run.running for run in self.slides.values())
        while in_flight < self.slots:
            ready = [(i, run.running) for i, run in self.slides.items() if run.queue and run.error is None]
            if not ready:
                return
            chosen = pick_slide(ready, self.slots)
            run = self.slides[chosen]
            self._submit(chosen, run.queue.popleft())
            run.running += 1
            in_flight += 1

    def _submit(self, slide_id: int, shard: Shard) -> None:
        plan = self.slides[slide_id].task_plan
        actor = min(range(len(self.actors)), key=self.actor_load.__getitem__)
        self.actor_load[actor] += 1
        if self.options.reads_in_actor:
            ref = self.actors[actor].run.remote(self.model_box, plan, shard)
        else:  # GPU actors: read and write in CPU tasks, so the model never waits for either
            region = self.pieces["read"].remote(plan, shard)
            output = self.actors[actor].predict.remote(self.model_box, plan, shard, region)
            ref = self.pieces["write"].remote(plan, shard, output)
        self.waiting[ref] = ("shard", slide_id, actor)

    # ------------------------------------------------------------------ what comes back
    def _handle(self, ref: Any) -> None:
        import ray

        kind, *what = self.waiting.pop(ref)
        try:
            value, error = ray.get(ref), None
        except Exception as failure:  # a task's exception, a lost worker after its retries, ...
            value, error = None, _reason(failure)
        if kind == "plan":
            request, started = what
            self.planning -= 1
            if error is not None:
                self._report(_plan_failure(request, error))
            else:
                self._start(value, started)
        elif kind == "shard":
            slide_id, actor = what
            self.actor_load[actor] -= 1
            run = self.slides[slide_id]
            run.running -= 1
            outcome = value if error is None else ShardOutcome(error=error)
            run.tiles += outcome.tiles
            run.model_seconds += outcome.model_seconds
            if outcome.error and run.error is None:
                run.error = outcome.error
            self.progress.shard(outcome)
            self._maybe_finish(slide_id)
        else:  # finalize
            slide_id, = what
            run = self.slides.pop(slide_id)
            if error is not None:
                run.error = f"finalizing the store: {error}"
            elif value:
                logger.warning("%s", value)  # the preview could not be made
            self._complete(run)

    def _maybe_finish(self, slide_id: int) -> None:
        run = self.slides[slide_id]
        if not run.finished_running:
            return
        if run.error is not None or run.plan.complete:  # failed, or complete before this run: kept as it is
            if run.error is not None:
                untouched = sum(len(shard.tiles) for shard in run.queue)
                run.error = f"{run.error} ({untouched} tiles not run)" if untouched else run.error
            self._complete(self.slides.pop(slide_id))
            return
        ref = self.pieces["finalize"].remote(run.task_plan, self.previews)
        self.waiting[ref] = ("finalize", slide_id)

    def _complete(self, run: SlideRun) -> None:
        self._report(run.plan.result(run.tiles, time.perf_counter() - run.started, run.error, run.model_seconds))

    def _report(self, result: SegmentResult) -> None:
        log = logger.info if result.ok else logger.warning
        log("%s: %s (%d tiles in %.1f s, model busy %.0f %%) -> %s", result.slide, result.status, result.tiles_run,
            result.seconds, 100 * result.model_busy, result.output)  # fmt: skip
        self.progress.slide(result)
        self.on_result(result)


def pick_slide(ready: Sequence[tuple[int, int]], slots: int) -> int:
    """The slide that gets the next free slot: ``ready`` is (slide id, shards running) of the slides with shards
    waiting, oldest first. The oldest wins unless it already holds half the slots while others wait."""
    if len(ready) == 1:
        return ready[0][0]
    cap = max(1, slots // 2)
    return next((slide for slide, running in ready if running < cap), ready[0][0])


def segment_slides_ray(
    plans: Sequence[SlidePlan],
    model: Any,
    options: RayOptions | None = None,
    **overrides: Any,
) -> list[SegmentResult]:
    """Segment slides planned beforehand (:func:`pipeline.inference.engine.plan_slide`) on Ray; one result per
    plan, in order. ``model``: the :class:`unet.UNet` the plans were made with, or its artifact path; options
    from ``options`` and/or keyword overrides of its fields (``actors=2, gpus_per_actor=1``). A slide whose
    shard fails is reported ``"failed: <reason>"`` and left unfinalized (resumable); the others complete.
    Starts a local Ray on loopback if none is running; plans with nothing to run need no Ray at all."""
    unknown = set(overrides) - {f.name for f in fields(RayOptions)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; valid: {[f.name for f in fields(RayOptions)]}")
    options = replace(options or RayOptions(), **overrides)
    results: dict[int, SegmentResult] = {}
    if not any(plan.shards for plan in plans):  # complete or all background: finalize here, no Ray needed
        return [_finish_here(plan) for plan in plans]
    from pipeline.inference.engine import resolve_model
    from pipeline.inference.ray_setup import init_ray
    from pipeline.inference.ray_runner import PACKAGE_ROOT

    model = resolve_model(model)
    check_plans(plans, model)
    init_ray(repo_root=PACKAGE_ROOT)
    outputs = {plan.store.path: k for k, plan in enumerate(plans)}
    scheduler = Scheduler(
        plans, model, options, lambda result: results.__setitem__(outputs[result.output], result),
        probabilities=any(plan.probabilities for plan in plans), tile_size=plans[0].grid.tile_size,
        total=len(plans),
    )  # fmt: skip
    scheduler.run()
    return [results[k] for k in range(len(plans))]


def _finish_here(plan: SlidePlan) -> SegmentResult:
    started, error = time.perf_counter(), None
    try:
        plan.finalize()
    except Exception as failure:
        error = f"finalizing the store: {one_line(failure)}"
    return plan.result(0, time.perf_counter() - started, error)


def check_plans(plans: Sequence[SlidePlan], model: Any) -> None:
    """One actor pool runs one TilePredictor: every slide must share the tile geometry, and each plan must have
    been made for ``model`` (its recorded checksum)."""
    from unet.artifact import model_checksum

    geometry = {(p.grid.tile_size, p.grid.halo, p.grid.input_size, p.grid.crop) for p in plans}
    if len(geometry) > 1:
        raise ValueError(
            "all slides in one Ray run need the same tile geometry (tile_size, halo, input, crop); "
            f"got {sorted(geometry)}"
        )
    checksum = model_checksum(model)
    for plan in plans:
        if plan.model_checksum != checksum:
            raise ValueError(
                f"{plan.slide.name}: planned for another model ({plan.model_checksum[:16]}, not {checksum[:16]}); "
                "plan it with this model"
            )


def _reason(failure: BaseException) -> str:
    """One line for a failed task: the task's own exception when Ray wrapped it."""
    cause = getattr(failure, "cause", None)
    return one_line(cause if isinstance(cause, BaseException) else failure)


def _plan_failure(request: PlanRequest, reason: str) -> SegmentResult:
    from pipeline.inference.report import failed_result, name_slide

    return failed_result(request.slide, request.output, name_slide(request.slide, reason),
                         request.settings.get("level") or 0)  # fmt: skip


class _CohortProgress:
    """One bar for the run: slides finished (of the total when known), tiles, output Mpx/s, model busy."""

    def __init__(self, enabled: bool, total: int | None) -> None:
        self.bar, self.started, self.tiles, self.pixels, self.busy = None, time.perf_counter(), 0, 0, 0.0
        self.tile_pixels = 0
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="slide", desc="slides")

    def slide_started(self, plan: SlidePlan) -> None:
        self.tile_pixels = plan.grid.tile_size**2

    def shard(self, outcome: ShardOutcome) -> None:
        self.tiles += outcome.tiles
        self.busy += outcome.model_seconds
        if self.bar is not None:
            elapsed = max(time.perf_counter() - self.started, 1e-9)
            self.bar.set_postfix_str(f"{self.tiles} tiles, {self.tiles * self.tile_pixels / 1e6 / elapsed:.2f} Mpx/s, "
                                     f"model busy {self.busy / elapsed:.0%}")  # fmt: skip

    def slide(self, result: SegmentResult) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
