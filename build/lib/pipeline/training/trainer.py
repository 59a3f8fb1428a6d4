"""Driver side: run :func:`pipeline.training.loop.train_fn` under ``ray.train.torch.TorchTrainer``.

The run lives in ``<storage_path>/<name>``: Ray Train's checkpoints, ``metrics.jsonl`` (one line per
epoch) and ``best-model.pt`` (the best epoch's artifact, ready for ``jobs/segment_slides.py --model``).
Calling :func:`fit` again with the same name and storage path resumes from the latest checkpoint;
a larger ``epochs`` extends a finished run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pipeline.training.config import METRIC_MODES, TrainConfig

logger = logging.getLogger(__name__)


def run_directory(storage_path: str | Path, name: str) -> Path:
    return Path(storage_path).expanduser().resolve() / name


def fit(
    cfg: TrainConfig,
    name: str,
    storage_path: str | Path,
    num_workers: int = 1,
    use_gpu: bool = False,
    max_failures: int = 0,
    keep_checkpoints: int = 3,
    export: str | Path | None = None,
):
    """Train (or resume) the run ``name`` under ``storage_path``; returns Ray Train's ``Result``.

    ``num_workers``: Ray Train workers (one GPU each with ``use_gpu``); 0 runs the loop in this process
    (Ray Train's local mode: no Ray checkpoints, so the loop keeps its own last state in the run directory).
    ``export``: copy the best model artifact there at the end.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.training.loop import train_fn

    run_dir = run_directory(storage_path, name)
    cfg.run_dir = str(run_dir)
    cfg.local_mode = num_workers == 0
    resources = {"CPU": max(1, cfg.cpus_per_worker), **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_fn,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    result = trainer.fit()
    best = run_dir / "best-model.pt"
    if best.is_file():
        from unet import load_model

        for warning in card_warnings(load_model(best).card):
            logger.warning("%s: %s", best, warning)
    if export is not None:
        if not best.is_file():
            raise FileNotFoundError(f"{best}: no best model was written (did any epoch run?)")
        Path(export).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(best, export)
        logger.info("exported %s -> %s", best, export)
    return result


GENERIC_CLASS_NAMES = ({"background", "foreground"}, {"foreground"})


def card_warnings(card) -> list[str]:
    """What a trained model does not say about itself and a user of it needs: its µm/px and real class names."""
    warnings = []
    if card.mpp is None:
        warnings.append("the model records no µm/px: segment_slides.py will run it at level 0 whatever the scan's "
                        "resolution; train with --mpp X (and --image-mpp GLOB=MPP for your images) to record it")  # fmt: skip
    names = {name.lower() for name in card.class_names or ["foreground"]}
    if any(names == generic for generic in GENERIC_CLASS_NAMES) or any(name.startswith("class_") for name in names):
        warnings.append(f"its class names are the defaults {card.class_names}: tables, GeoJSON and viewers will "
                        "show those; train with --class-names NAME ... to name them")  # fmt: skip
    return warnings


def best_mode(metric: str) -> str:
    return METRIC_MODES[metric]
