"""The Ray executor: many slides' tiles through one Ray Data stream and one shared pool of model actors.

Pipeline (Ray Data, streaming with backpressure, so no slide is ever materialised)::

    from_items(tile descriptors of all slides, round-robin)      {slide, row, col}, a few tiles per block
      -> map_batches(ReadWindows)            CPU tasks           + window (N, I, I, C) uint8, error
      -> map_batches(Predict, ActorPool)     model actors        - window + labels[, probabilities]
      -> map_batches(WriteTiles)             CPU tasks           OutputStore.write_tile per tile, -> error
      -> driver: iter_batches                per-slide progress; finalize each slide once all its tiles are in

On GPU actors the reads are CPU tasks on the node's other cores, so the GPU never waits for a read. CPU
actors read their own windows instead (``Predict(reader=...)``, see :func:`build_dataset`): two calls in
flight per actor, so one batch is read while the previous one is in the forward pass.

It runs exactly the pieces of :func:`pipeline.inference.engine.segment_slide` (``plan_slide``, and the tile-batch
path of :mod:`pipeline.inference.tile_batches`: ``read_batch``, :class:`TilePredictor`, ``write_batch``), so on CPU in float32 the stores are
bit-identical, given the same torch thread count (an actor uses ``cpus_per_actor`` threads; other counts
can round a rare uint8 probability the other way). A tile whose read or write fails is marked with an ``error`` and skipped; its slide is
reported ``"failed: <reason>"`` and never finalised (rerunning the job re-runs just its missing tiles),
while the other slides complete.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.text import one_line
from pipeline.inference.engine import SegmentResult, SlidePlan, resolve_model
from unet.artifact import model_checksum
from pipeline.inference.predict import TilePredictor, resolve_amp
from pipeline.inference.tile_batches import TileProgress, read_batch, write_batch
from pipeline.inference.ray_setup import init_ray

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """How the Ray run is laid out. ``actors``: size of the model actor pool; ``gpus_per_actor``: 0 runs the
    actors on CPU (fractions share a GPU); ``cpus_per_actor``: CPUs (and torch threads on CPU) per actor;
    ``batch_size``: tiles per forward pass; ``amp``: None/"off", "auto", "bf16", "fp16" (see TilePredictor);
    ``read_tasks``: read the windows in CPU tasks of their own (None: on GPU actors only; CPU actors read their
    own windows beside the forward pass, see :func:`build_dataset`)."""

    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 4
    amp: str | None = None
    compile: bool = False
    progress: bool = True
    read_tasks: bool | None = None

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.batch_size < 1 or int(self.batch_size) != self.batch_size:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("gpus_per_actor and cpus_per_actor must be >= 0")
        resolve_amp(self.amp, torch.device(self.device))  # reject a bad amp here, not in every actor

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @property
    def reads_in_actor(self) -> bool:
        return not self.read_tasks if self.read_tasks is not None else self.device == "cpu"


PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/ and unet/


def check_cpus_left(options: RayOptions) -> None:
    """Refuse a pool that takes every CPU: reads and writes would never get one and the run would hang."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    taken = options.actors * options.cpus_per_actor
    if taken >= total:
        raise ValueError(
            f"{options.actors} actors x {options.cpus_per_actor:g} CPUs take all {total:g} CPUs of the Ray cluster, "
            "leaving none to read and write tiles; lower --actors or --cpus-per-actor, or give Ray more CPUs"
        )


# --------------------------------------------------------------------------- the three stages
class ReadWindows:
    """CPU stage: each tile's mirrored input window; a failed read gives zeros and an ``error``.

    Holds the plans (without their tile lists); slide sources are pickled by path and reopen their file
    handles once per worker process (cached)."""

    def __init__(self, plans: Sequence[SlidePlan]):
        self.plans = plans

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        windows, errors = read_batch(self.plans, tile_keys(batch))
        return {**batch, "window": windows, "error": errors}


def tile_keys(batch: dict[str, np.ndarray]) -> list[tuple[int, int, int]]:
    """The (plan index, row, col) keys of a block of tile descriptors."""
    return list(zip(batch["slide"].tolist(), batch["row"].tolist(), batch["col"].tolist()))


READS_IN_FLIGHT = 2  # calls per CPU actor: one reading while the other is in the forward pass
BATCHES_PER_BLOCK = 4  # forward batches per Ray Data block with CPU actors: 4x fewer blocks, tasks and stats updates


class Predict:
    """Actor stage: ONE TilePredictor per actor (model fetched from the object store once).

    With a ``reader`` the actor reads its batches' windows itself. Ray Data then runs two calls at once
    (``READS_IN_FLIGHT``): the read (OpenSlide and numpy, mostly outside the GIL) of one batch overlaps the
    forward pass of the other, and a lock keeps forward passes one at a time, so the model's threads are
    never shared between two batches."""

    def __init__(self, model_ref: Any, grid: Any, device: str, amp: str | None, probabilities: bool,
                 compile: bool, batch_size: int, threads: int, reader: ReadWindows | None = None) -> None:  # fmt: skip
        import ray

        model = ray.get(model_ref) if isinstance(model_ref, ray.ObjectRef) else model_ref
        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)  # process-wide: the call threads pick it up at their first op
        self.probabilities, self.reader = probabilities, reader
        self.predictor = TilePredictor.for_grid(
            model, grid, device=device, amp=amp, probabilities=probabilities, compile=compile, batch_size=batch_size
        )
        self.tile_size, self.classes, self.batch_size = grid.tile_size, model.num_classes, batch_size
        self.forward_lock = threading.Lock()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.reader is not None:
            batch = self.reader(batch)
        count, t = len(batch["slide"]), self.tile_size
        ok = np.flatnonzero(np.asarray([not e for e in batch["error"]], dtype=bool))
        labels = np.zeros((count, t, t), dtype=np.uint8)
        probs = np.zeros((count, self.classes, t, t), dtype=np.uint8) if self.probabilities else None
        model_seconds = 0.0
        for start in range(0, len(ok), self.batch_size):  # a block may hold several forward batches
            chosen = ok[start : start + self.batch_size]
            with self.forward_lock:  # so the predictor's busy time grows by this call's forward pass only
                before = self.predictor.busy_seconds
                output = self.predictor(batch["window"][chosen])  # fancy indexing copies the read-only view
                model_seconds += self.predictor.busy_seconds - before
            labels[chosen] = output["labels"]
            if probs is not None:
                probs[chosen] = output["probabilities"]
        result = {key: value for key, value in batch.items() if key != "window"}
        result["labels"] = labels
        result["model_seconds"] = np.full(count, model_seconds / max(count, 1))  # the block's share per tile
        if probs is not None:
            result["probabilities"] = probs
        return result


class WriteTiles:
    """CPU stage: ``OutputStore.write_tile`` per good tile (whole chunks, one writer each, then its state)."""

    def __init__(self, plans: Sequence[SlidePlan]):
        self.plans = plans

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = write_batch(self.plans, tile_keys(batch), batch["labels"], batch.get("probabilities"), batch["error"])
        return {"slide": batch["slide"], "row": batch["row"], "col": batch["col"], "error": errors,
                "model_seconds": batch["model_seconds"]}  # fmt: skip


# --------------------------------------------------------------------------- driver
def interleave(plans: Sequence[SlidePlan], run: int) -> list[dict[str, int]]:
    """Tile descriptors of all slides, round-robin in runs of ``run`` tiles, so slides share the pool."""
    queues = [[{"slide": s, "row": t.row, "col": t.col} for t in plan.tiles] for s, plan in enumerate(plans)]
    items, offset = [], 0
    while any(offset < len(q) for q in queues):
        for queue in queues:
            items.extend(queue[offset : offset + run])
        offset += run
    return items


def check_plans(plans: Sequence[SlidePlan], model: torch.nn.Module) -> None:
    """One actor pool runs one TilePredictor: every slide must share the tile geometry, and each plan must have
    been made for ``model`` (its recorded checksum)."""
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


def build_dataset(plans: Sequence[SlidePlan], model: torch.nn.Module, options: RayOptions):
    """The lazy Ray Dataset for ``plans``; rows out: {slide, error} per tile."""
    import ray

    items = interleave(plans, options.batch_size)
    plans = [replace(plan, tiles=[]) for plan in plans]  # the stages get each plan's facts; the items carry tiles
    read_in_actor = options.reads_in_actor
    block = options.batch_size * (BATCHES_PER_BLOCK if read_in_actor else 1)  # tiles per read / write task
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    model_ref = ray.put(model)
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / block)))
    reader = ReadWindows(plans)
    # GPU actors: reads are CPU tasks on the node's other cores, so the GPU never waits for a read.
    # CPU actors read their own windows: the forward pass is ~15x a batch's read there, so one core
    # reads for the actor with time to spare, two calls in flight overlap the read with the previous
    # forward, and no read task competes for Ray's CPUs. (As separate CPU tasks beside CPU actors on
    # 2 CPUs, Ray Data's allocator gave the one free CPU to the reads and none to the writes, and every
    # label tile queued in the object store until the last read: 314 MiB at 1 gigapixel, 2026-11-21.)
    if not read_in_actor:
        ds = ds.map_batches(reader, batch_size=None, batch_format="numpy", num_cpus=1)
    calls = READS_IN_FLIGHT if read_in_actor else None
    ds = ds.map_batches(
        Predict,
        fn_constructor_kwargs=dict(
            model_ref=model_ref, grid=plans[0].grid, device=options.device, amp=options.amp,
            probabilities=any(plan.probabilities for plan in plans),
            compile=options.compile, batch_size=options.batch_size, threads=max(1, int(options.cpus_per_actor)),
            reader=reader if read_in_actor else None,
        ),
        compute=ray.data.ActorPoolStrategy(size=options.actors, max_concurrent_calls_per_actor=calls,
                                           enable_true_multi_threading=read_in_actor),
        num_gpus=options.gpus_per_actor or None,
        num_cpus=options.cpus_per_actor,
        batch_size=block,
        batch_format="numpy",
    )  # fmt: skip
    writers = [replace(plan, slide=None) for plan in plans]  # they write stores; an in-memory slide stays behind
    return ds.map_batches(WriteTiles(writers), batch_size=None, batch_format="numpy")


class _SlideProgress:
    """Per-slide counters, the tqdm bar and the result once the slide's last tile is in.

    Tiles are counted by (row, col), so a block that Ray re-delivers after a retried task is counted once;
    the store's own ``tiles/state`` is checked again before the slide is marked complete."""

    def __init__(self, plan: SlidePlan, position: int, enabled: bool, started: float):
        self.plan, self.started = plan, started
        self.done: set[tuple[int, int]] = set()
        self.failed: dict[tuple[int, int], str] = {}
        self.model_seconds = 0.0
        self.result: SegmentResult | None = None
        self.bar = TileProgress(plan, enabled, position)

    @property
    def pending(self) -> int:
        return len(self.plan.tiles) - len(self.done) - len(self.failed.keys() - self.done)

    def update(self, outcomes: list[tuple[int, int, str, float]]) -> None:
        before = len(self.done) + len(self.failed)
        for row, col, error, model_seconds in outcomes:
            self.model_seconds += model_seconds
            if error:
                self.failed.setdefault((row, col), error)
            else:
                self.done.add((row, col))
        self.bar.update(len(self.done) + len(self.failed) - before, len(self.done), self.model_seconds)

    def finish(self, pipeline_error: str | None = None) -> SegmentResult:
        """Finalize the store if every tile is in and none failed; otherwise report the slide failed."""
        if self.result is not None:
            return self.result
        plan = self.plan
        failed = self.failed.keys() - self.done  # a tile that failed once and then succeeded is done
        error = None
        if failed:
            error = f"{len(failed)} of {len(plan.tiles)} tiles failed: {self.failed[min(failed)]}"
        elif self.pending:
            error = f"{pipeline_error or 'the run stopped early'} ({self.pending} tiles not run)"
        else:
            try:
                plan.finalize()
            except Exception as finalize_error:
                error = f"finalizing the store: {one_line(finalize_error)}"
        self.bar.close()
        self.result = plan.result(len(self.done), time.perf_counter() - self.started, error, self.model_seconds)
        log = logger.info if self.result.ok else logger.warning
        log("%s: %s (%d tiles in %.1f s, model busy %.0f %%) -> %s", self.result.slide, self.result.status, len(self.done),
            self.result.seconds, 100 * self.result.model_busy, plan.store.path)  # fmt: skip
        return self.result


def segment_slides_ray(
    plans: Sequence[SlidePlan],
    model: torch.nn.Module | str | Path,
    options: RayOptions | None = None,
    **overrides: Any,
) -> list[SegmentResult]:
    """Segment the planned slides (see :func:`pipeline.inference.engine.plan_slide`) on Ray; one result per plan, in order.

    ``model``: the :class:`unet.UNet` the plans were made with, or its artifact path. Options come from
    ``options`` and/or keyword overrides of its fields (``actors=2, gpus_per_actor=1, batch_size=16``).
    Each slide is finalized as soon as its last tile is written; a slide with failed tiles gets status
    ``"failed: <reason>"`` and is left unfinalized (resumable); the others are unaffected. Starts a local
    Ray on loopback if none is running.
    """
    unknown = set(overrides) - {f.name for f in fields(RayOptions)}
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; valid: {[f.name for f in fields(RayOptions)]}")
    options = replace(options or RayOptions(), **overrides)
    started = time.perf_counter()
    progress = [_SlideProgress(plan, i, options.progress, started) for i, plan in enumerate(plans)]
    active = [i for i, plan in enumerate(plans) if plan.tiles]
    pipeline_error = None
    if active:
        from ray.data import DataContext

        model = resolve_model(model)
        chosen = [plans[i] for i in active]
        check_plans(chosen, model)
        init_ray(repo_root=PACKAGE_ROOT)
        context = DataContext.get_current()
        saved = context.enable_progress_bars, context.print_on_execution_start
        context.enable_progress_bars = context.print_on_execution_start = False  # ours are per slide
        finishing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="finalize")  # pyramids off the stream
        try:
            check_cpus_left(options)
            ds = build_dataset(chosen, model, options)
            finished: set[int] = set()
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                per_slide: dict[int, list[tuple[int, int, str, float]]] = {}
                rows = zip(batch["slide"], batch["row"], batch["col"], batch["error"], batch["model_seconds"])
                for s, row, col, error, seconds in rows:
                    per_slide.setdefault(active[int(s)], []).append((int(row), int(col), error, float(seconds)))
                for i, outcomes in per_slide.items():
                    progress[i].update(outcomes)
                    if progress[i].pending == 0 and i not in finished:
                        finished.add(i)  # re-delivered blocks after this must not finalize it twice
                        finishing.submit(progress[i].finish)
        except Exception as error:  # pipeline-wide (actor died, predictor error): unfinished slides fail
            pipeline_error = one_line(error)
            logger.error("Ray pipeline failed: %s", pipeline_error)
        finally:
            finishing.shutdown(wait=True)
            context.enable_progress_bars, context.print_on_execution_start = saved
    return [p.finish(pipeline_error) for p in progress]
