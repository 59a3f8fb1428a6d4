"""The Ray pieces: model actors and the CPU tasks around them, each working on one shard of one slide.

Work units are shards (blocks of tiles written whole, see :class:`~pipeline.slides.geometry.Shard`). What
runs where::

    plan_task        CPU task     open the slide, detect tissue, create or reopen its store   -> SlidePlan
    ShardActor.run   model actor  read the shard's region once, predict its tiles, write it   (CPU actors)
    read_task        CPU task     the shard's input region            ]
    ShardActor.predict            its tiles' valid centres            ]  GPU actors: reads and writes on
    write_task       CPU task     the shard, durable, then marked done]  the node's other cores
    finalize_task    CPU task     pyramid by shards, status complete, preview

The actor and the read and write tasks are the tile path of :mod:`pipeline.inference.tile_batches`
(:class:`ShardActor`, ``read_shard``, ``write_outcome``), the plan task :func:`pipeline.inference.engine.plan_slide`, so on CPU in float32 the stores equal
the in-process engine's byte for byte (given the same torch thread count). The driver that schedules them
across slides is :mod:`pipeline.inference.scheduler`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.engine import SlidePlan, plan_slide
from pipeline.inference.predict import resolve_amp
from pipeline.inference.tile_batches import SHARDS_IN_FLIGHT, ShardActor, read_shard, write_outcome
from pipeline.text import one_line

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding pipeline/ and unet/


@dataclass(frozen=True)
class RayOptions:
    """How the Ray run is laid out. ``actors``: size of the model actor pool; ``gpus_per_actor``: 0 runs the
    actors on CPU (fractions share a GPU); ``cpus_per_actor``: CPUs (and torch threads on CPU) per actor;
    ``batch_size``: tiles per forward pass; ``forward_tiles``: tiles per side of one forward window (None: as many
    as make 512 px, see :func:`~pipeline.slides.geometry.forward_windows`); ``amp``: None/"off", "auto", "bf16",
    "fp16" (see TilePredictor); ``compile``: False, True, or "auto" (compile CPU actors once a slide, or an actor's
    run, reaches :data:`~pipeline.inference.predict.COMPILE_MIN_TILES` tiles);
    ``read_tasks``: read and write shards in CPU tasks of their own (None: on GPU actors only; CPU actors
    read and write beside their forward pass); ``lookahead``: slides planned ahead of the model (None:
    2 per actor + 2); ``threads_per_actor``: torch threads of a CPU actor (None: its node's cores shared by
    the node's actors, see :func:`actor_threads`)."""

    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 4
    forward_tiles: int | None = None
    amp: str | None = None
    compile: bool | str = False
    progress: bool = True
    read_tasks: bool | None = None
    lookahead: int | None = None
    threads_per_actor: int | None = None

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.batch_size < 1 or int(self.batch_size) != self.batch_size:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
        if self.gpus_per_actor < 0 or self.cpus_per_actor < 0:
            raise ValueError("gpus_per_actor and cpus_per_actor must be >= 0")
        if self.forward_tiles is not None and (self.forward_tiles < 1 or int(self.forward_tiles) != self.forward_tiles):
            raise ValueError(f"forward_tiles must be a positive whole number, got {self.forward_tiles}")
        if self.threads_per_actor is not None and self.threads_per_actor < 1:
            raise ValueError(f"threads_per_actor must be >= 1, got {self.threads_per_actor}")
        if self.lookahead is not None and self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        resolve_amp(self.amp, torch.device(self.device))  # reject a bad amp here, not in every actor
        if self.compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {self.compile!r}")

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @property
    def reads_in_actor(self) -> bool:
        return not self.read_tasks if self.read_tasks is not None else self.device == "cpu"

    @property
    def slides_ahead(self) -> int:
        return self.lookahead or 2 * self.actors + 2


def actor_threads(options: RayOptions) -> int:
    """Torch threads per model actor. CPU actors by default take every core of their node, shared by the
    node's actors (spread evenly): the CPU's reads and writes are cheap next to the forward, and on this
    project's 2-core machine 2 threads ran the bf16 job 1.4x faster end to end than 1 thread with a core
    left to the reads (docs/performance.md (a)). Ray still reserves ``cpus_per_actor`` for the actor,
    so plans, reads and finalizes keep CPUs to be scheduled on."""
    import ray

    if options.threads_per_actor:
        return options.threads_per_actor
    if options.device != "cpu":
        return max(1, int(options.cpus_per_actor))
    cores = [node["Resources"]["CPU"] for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU")]
    actors_per_node = -(-options.actors // max(1, len(cores)))
    return max(1, int(min(cores, default=1) // actors_per_node))


def check_cpus_left(options: RayOptions) -> None:
    """Refuse a pool that takes every CPU: plans, reads and writes would never get one and the run would hang."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    taken = options.actors * options.cpus_per_actor
    if taken >= total:
        raise ValueError(
            f"{options.actors} actors x {options.cpus_per_actor:g} CPUs take all {total:g} CPUs of the Ray cluster, "
            "leaving none to read and write tiles; lower --actors or --cpus-per-actor, or give Ray more CPUs"
        )


def plan_remote(request: Any, model: Any) -> SlidePlan:
    """Plan task: one slide planned on a cluster CPU; the plan travels without its slide's open handles."""
    return plan_slide(request.slide, request.output, model, **request.settings, lock_token=request.lock_token)


def finalize_remote(plan: SlidePlan, preview: bool) -> str | None:
    """Finalize task: pyramid (by shards, in threads), ``status: complete``, then the preview; returns the
    preview's failure (a convenience never fails a finished slide) or None."""
    plan.finalize()
    if not preview:
        return None
    from pipeline.store.results import write_preview

    store = Path(plan.store.path)
    try:
        write_preview(store, plan.slide, store.with_suffix(".png"))
    except Exception as error:
        return f"{store}: no preview ({one_line(error)})"
    return None


class ModelInStore:
    """The model's ObjectRef, boxed so that Ray passes it along unresolved."""

    def __init__(self, ref: Any) -> None:
        self.ref = ref


class RayShardActor:
    """:class:`ShardActor` as a Ray actor. Its constructor takes no ObjectRef, not even a nested one: Ray logs an
    error-level line for any restartable actor whose constructor arguments live in the object store
    (ray-project/ray#53727). Each call carries the boxed model reference instead; the actor fetches the model once
    (``load``, called right after it is created, or its first call) and a restarted actor fetches it again from
    the next call, while the driver keeps the model alive for the whole run."""

    def __init__(self, *args: Any) -> None:
        self.args, self.actor, self.lock = args, None, threading.Lock()

    def load(self, model: ModelInStore) -> None:
        self._shard_actor(model)

    def _shard_actor(self, model: ModelInStore) -> ShardActor:
        import ray

        with self.lock:
            if self.actor is None:
                self.actor = ShardActor(ray.get(model.ref), *self.args)
        return self.actor

    def run(self, model: ModelInStore, plan: Any, shard: Any) -> Any:
        return self._shard_actor(model).run(plan, shard)

    def predict(self, model: ModelInStore, plan: Any, shard: Any, block: Any) -> Any:
        return self._shard_actor(model).predict(plan, shard, block)


def ray_pieces(options: RayOptions) -> dict[str, Any]:
    """The remote functions and actor class, with the options' resources (created once Ray is up)."""
    import ray

    cpu_task = dict(num_cpus=1, max_retries=3)  # retried if a worker or node dies; never on a Python error
    return {
        "plan": ray.remote(**cpu_task)(plan_remote),
        "read": ray.remote(**cpu_task)(read_shard),
        "write": ray.remote(**cpu_task)(write_outcome),
        "finalize": ray.remote(**cpu_task)(finalize_remote),
        "actor": ray.remote(RayShardActor).options(
            num_cpus=options.cpus_per_actor, num_gpus=options.gpus_per_actor or None,
            max_concurrency=SHARDS_IN_FLIGHT if options.reads_in_actor else 1,
            max_restarts=-1, max_task_retries=-1,  # a killed actor comes back and its shards run again
        ),  # fmt: skip
    }


def without_shards(plan: SlidePlan) -> SlidePlan:
    """The plan as tasks get it: its facts, not its list of shards (each task names its own); it still says how
    many tiles the slide has to run (``--compile auto`` decides by it)."""
    return replace(plan, shards=[], tiles_unlisted=plan.tiles_to_run)
