"""Training the U-Net with Ray Train: the paper's recipe (weighted cross-entropy with the border weight
map, elastic deformation, SGD with high momentum or Adam), data from image/label folders or whole slides,
validation with pixel error, Dice and the ISBI 2012 Rand error, checkpoints and resume.

    from pipeline.training import TrainConfig, fit
    fit(TrainConfig(data=["../shared/data/nuclei"], base_channels=16, depth=3), name="nuclei", storage_path="runs")

Modules: ``weights`` (w_c and the border weight map), ``augment`` (elastic, flips, stain jitter),
``files`` (pairs, label conventions, µm/px), ``data`` (patch datasets), ``metrics``, ``evaluate``
(validation with the inference tiling), ``build`` (config -> data and model), ``loop`` (``train_fn``
run by each Ray Train worker) and ``trainer`` (``fit``: TorchTrainer on the driver).

It lives in :mod:`pipeline` because it applies the model to slides (reads, tissue, tiling) and validates
with the inference predictor. May import: :mod:`pipeline.slides`, :mod:`pipeline.store` (atomic files),
:mod:`pipeline.inference` (the predictor and tile-batch path), :mod:`unet`, torch, Ray Train. Nothing in :mod:`pipeline` imports training but ``jobs/``.
"""

from pipeline.training.config import TrainConfig
from pipeline.training.metrics import MetricTotals, adapted_rand_error, dice, pixel_error, rand_error
from pipeline.training.trainer import fit, run_directory
from pipeline.training.weights import border_weight, class_balance_weights, weight_map

__all__ = [
    "TrainConfig",
    "fit",
    "run_directory",
    "weight_map",
    "border_weight",
    "class_balance_weights",
    "adapted_rand_error",
    "rand_error",
    "dice",
    "pixel_error",
    "MetricTotals",
]
