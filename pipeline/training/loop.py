"""``train_fn(config)``: the per-worker training loop that ``ray.train.torch.TorchTrainer`` runs.

Each epoch: train on this rank's share of the patches (DDP via ``prepare_model``/``prepare_data_loader``;
gloo on CPU, nccl on GPU), validate on this rank's share of the held-out regions, sum the counts over
ranks, then every rank calls ``ray.train.report(metrics, checkpoint=...)`` (a barrier); rank 0 alone
writes the checkpoint directory (``state.pt``: model, optimiser, scaler, epoch, best metric; ``model.pt``:
the artifact) and, when the epoch is the best so far, ``<run_dir>/best-model.pt``. A rerun with the same
run name and storage path gets the latest checkpoint from ``ray.train.get_checkpoint()`` and continues
with the next epoch.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.store.durability import atomic_file
from unet.artifact import save_model
from pipeline.training.build import build_data, build_dataset, build_model
from pipeline.training.config import METRIC_MODES, TrainConfig
from pipeline.training.data import EpochSampler
from pipeline.training.evaluate import evaluate
from pipeline.training.metrics import MetricTotals

logger = logging.getLogger(__name__)

STATE_FILE = "state.pt"
LOCAL_CHECKPOINT = "local-checkpoint"  # in-process (num_workers=0) runs keep their own last checkpoint here


def amp_settings(amp: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use GradScaler) for ``amp`` on ``device``."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp == "off":
        return None, False
    if amp == "bf16":
        return torch.bfloat16, False
    return torch.float16, True


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Mean over pixels of w(x) * -log p_{l(x)}(x) (the paper's energy, per pixel)."""
    loss = F.cross_entropy(logits.float(), target, reduction="none")
    return (loss * weights).mean() if weights is not None else loss.mean()


def _all_reduce(values: np.ndarray, device: torch.device) -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def _is_better(value: float, best: float | None, metric: str) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    if best is None:
        return True
    return value > best if METRIC_MODES[metric] == "max" else value < best


def _load_state(cfg: TrainConfig) -> dict[str, Any] | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            return read_state(Path(directory) / STATE_FILE)
    if cfg.local_mode and cfg.run_dir and (Path(cfg.run_dir) / LOCAL_CHECKPOINT / STATE_FILE).is_file():
        return read_state(Path(cfg.run_dir) / LOCAL_CHECKPOINT / STATE_FILE)
    return None


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's state, which holds only tensors, numbers, strings and containers of them: loaded with
    ``weights_only=True`` so that a tampered file on shared storage cannot run code on every worker."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for anything but plain data; RuntimeError, EOFError, ...
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise ValueError(
            f"{path}: refusing this training checkpoint ({type(error).__name__}: {reason}); it holds something other "
            "than tensors and numbers or is damaged: delete it, or train under a new run name, to start afresh"
        ) from None
    if not (isinstance(state, dict) and isinstance(state.get("epoch"), int) and isinstance(state.get("model"), dict)):
        raise ValueError(f"{path}: not a training checkpoint of this software (no model or epoch); delete it")
    return state


RECIPE_KEYS = ("optimizer", "lr", "momentum", "batch_size", "output_size", "weight_map", "class_balance", "w0", "sigma",
               "contact_weight", "elastic", "stain_jitter", "flips", "amp", "boundary_width", "contact_width", "core",
               "scale_range", "blur", "jpeg", "negative_fraction")  # fmt: skip


def recipe_of(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that make a model what it is (the card's ``metadata["recipe"]``), as JSON values."""
    config = cfg.to_dict()
    return json.loads(json.dumps({k: config[k] for k in RECIPE_KEYS}))


def instance_metadata(cfg: TrainConfig) -> dict[str, Any]:
    """{"instances": rule} for models with a boundary class: how the job turns their class map into objects
    (seeds = interior components, grown over the rim; see pipeline.analysis.instances)."""
    if not cfg.boundary_width:
        return {}
    from pipeline.analysis.instances import InstanceRule

    return {"instances": InstanceRule(seed_class=1, grow_classes=(2,), grow_steps=cfg.rim.reach + 1).to_dict()}


def _append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def train_fn(config: dict[str, Any]) -> None:
    """The training loop of one Ray Train worker (see module docstring); ``config`` is a TrainConfig dict."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    cfg = TrainConfig.from_dict(config)
    # Ray Train logs two INFO lines per epoch ("Checkpoint successfully created", "Reporting training result");
    # the epoch line below says what a user needs. Its warnings and errors still show.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this one is named by its file's path, not its module
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray version: its lines stay
        pass
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, cfg.cpus_per_worker))
    amp_dtype, use_scaler = amp_settings(cfg.amp, device)
    channels_last = device.type == "cuda"

    data = build_data(cfg)
    state = _load_state(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(cfg, data)
    if state is not None:
        model.load_state_dict(state["model"])
    dataset = build_dataset(cfg, data, model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    net = getattr(model, "module", model)  # the bare UNet: validation and saving

    lr = cfg.learning_rate
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    start_epoch, best, best_epoch = 0, None, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if use_scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state.get("best"), state.get("best_epoch")
        if rank == 0:
            logger.info("resuming after epoch %d (best %s = %s)", state["epoch"], cfg.best_metric, best)

    sampler = EpochSampler(len(dataset), rank, world, cfg.seed, shuffle=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.loader_workers,
        pin_memory=device.type == "cuda", persistent_workers=cfg.loader_workers > 0,
        prefetch_factor=4 if cfg.loader_workers > 0 else None,
    )  # fmt: skip
    loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    my_val = data.val_items[rank::world]
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    class_names = cfg.class_names or (["background", "foreground"] if data.num_classes == 2 else None)
    artifact_meta = {
        "label_mode": data.label_mode,
        "train_images": data.train_names,
        "val_images": data.val_names,
        "recipe": recipe_of(cfg),
        "negatives": [str(Path(regions).name) for _, regions in cfg.negatives],
        **instance_metadata(cfg),
    }  # fmt: skip

    for epoch in range(start_epoch, cfg.epochs):
        started = time.perf_counter()
        if cfg.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / max(1, cfg.epochs)))
        sampler.set_epoch(epoch)
        model.train()
        loss_sum, steps, samples = 0.0, 0, 0
        progress = EpochProgress(epoch, cfg.epochs, len(loader), cfg.max_steps_per_epoch, show=rank == 0)
        for step, (inputs, target, weights) in enumerate(loader):
            if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
                break
            if channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = model(inputs)
            loss = weighted_cross_entropy(logits, target, weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += float(loss.detach())
            steps += 1
            samples += inputs.shape[0]
            progress.step(steps, loss_sum / steps, samples)
        train_seconds = time.perf_counter() - started

        validate = cfg.validate_every > 0 and ((epoch + 1) % cfg.validate_every == 0 or epoch + 1 == cfg.epochs)
        totals = MetricTotals()
        if validate:
            totals = evaluate(net, my_val, data.label_mode, cfg.val_tile, device, amp_dtype, channels_last,
                              cfg.rim)
        summed = _all_reduce(np.concatenate([totals.as_vector(), [loss_sum, steps, samples]]), device)
        val = MetricTotals.from_vector(summed[:-3]).summary() if summed[6] > 0 else {}
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(summed[-3] / max(1.0, summed[-2])),
            "train_samples_per_s": float(summed[-1] / max(train_seconds, 1e-9)),
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - started,
            **{f"val_{k}": float(v) for k, v in val.items()},
        }
        metric = cfg.best_metric if cfg.best_metric in metrics else "train_loss"
        improved = _is_better(metrics[metric], best, metric)
        if improved:
            best, best_epoch = metrics[metric], epoch
        metrics.update({"best_metric": metric, "best_value": best, "best_epoch": best_epoch, "start_epoch": start_epoch})

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                state = {
                    "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if use_scaler else None,
                    "epoch": epoch,
                    "best": best,
                    "best_epoch": best_epoch,
                    "metrics": metrics,
                }
                torch.save(state, Path(tmp) / STATE_FILE)
                extra = {"epoch": epoch, "metrics": metrics, **artifact_meta}
                save_model(net, Path(tmp) / "model.pt", class_names=class_names, mpp=cfg.mpp, **extra)
                if run_dir is not None:
                    _append_jsonl(run_dir / "metrics.jsonl", metrics)
                    if improved:
                        save_model(net, run_dir / "best-model.pt", class_names=class_names, mpp=cfg.mpp, **extra)
                    if cfg.local_mode:
                        _save_local_checkpoint(run_dir, state)
                checkpoint = Checkpoint.from_directory(tmp)
                show(_epoch_line(metrics, cfg.epochs))
            ray.train.report(metrics, checkpoint=checkpoint)


def _save_local_checkpoint(run_dir: Path, state: dict) -> None:
    directory = run_dir / LOCAL_CHECKPOINT
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_file(directory / STATE_FILE) as partial:
        torch.save(state, partial)


class EpochProgress:
    """Rank 0's progress within an epoch: a line at most every ``every`` seconds (and none for short epochs),
    so a long first epoch shows it is moving."""

    def __init__(self, epoch: int, epochs: int, batches: int, limit: int | None, show: bool, every: float = 30.0):
        self.epoch, self.epochs, self.show, self.every = epoch, epochs, show, every
        self.total = min(batches, limit) if limit is not None else batches
        self.started = self.last = time.perf_counter()

    def step(self, steps: int, mean_loss: float, samples: int) -> None:
        now = time.perf_counter()
        if not self.show or now - self.last < self.every or steps >= self.total:
            return
        self.last = now
        rate = samples / max(now - self.started, 1e-9)
        left = (self.total - steps) * (now - self.started) / steps
        show(f"epoch {self.epoch + 1}/{self.epochs}: step {steps}/{self.total}, loss {mean_loss:.4f}, "
             f"{rate:.1f} samples/s, ~{left:.0f} s left in the epoch")


def show(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver. Not ``print``: Ray Train 2.x
    patches it in its workers to log to the root logger *and*, because Ray replaced ``sys.stdout``, also to
    print, so every line reached the user twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _epoch_line(metrics: dict, epochs: int) -> str:
    parts = [f"epoch {metrics['epoch'] + 1}/{epochs}", f"loss {metrics['train_loss']:.4f}"]
    for key in ("val_loss", "val_pixel_error", "val_dice", "val_rand_error"):
        if key in metrics:
            parts.append(f"{key} {metrics[key]:.4f}")
    parts.append(f"{metrics['train_samples_per_s']:.1f} patches/s, {metrics['epoch_seconds']:.0f} s")
    return " | ".join(parts)
