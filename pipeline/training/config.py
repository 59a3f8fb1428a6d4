"""All settings of a training run in one plain dataclass (shipped to every Ray Train worker as a dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pipeline.training.files import Rim

# metric name -> "min" or "max" (what counts as better)
# ("epoch": the last epoch is the best, so no held-out image chooses the model: cross-validation uses it)
METRIC_MODES = {"epoch": "max", "val_dice": "max", "val_rand_error": "min", "val_pixel_error": "min", "val_loss": "min", "train_loss": "min"}


@dataclass
class TrainConfig:
    # ---- data: folders of image/label pairs (DIR/images, DIR/labels) and/or whole slides with label masks
    data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)  # extra folders used only for validation
    val_files: list[str] = field(default_factory=list)  # stems / globs of --data images held out
    val_split: float = 0.2  # seeded random fraction held out when val_files/val_data are not given
    slides: list[list[str]] = field(default_factory=list)  # [[slide, label mask], ...]
    val_slides: list[list[str]] = field(default_factory=list)
    negatives: list[list[str]] = field(default_factory=list)  # [[slide, regions.json], ...]: marked object-free areas
    negative_fraction: float = 0.15  # share of the patches drawn from the negatives' regions
    slide_level: int = 0
    val_tiles_per_slide: int = 8
    label_mode: str = "auto"  # auto | binary | classes | instances
    num_classes: int | None = None  # default: from the labels (2 for binary/instances, 3 with boundary_width)
    boundary_width: int = 0  # instance labels: > 0 adds a class for each object's rim of this many px
    contact_width: int = 0  # ... and, where objects touch, for every object pixel this close to another object
    core: float = 0.0  # ... and for pixels nearer the edge than this share of the object's inner radius
    mpp: float | None = None  # µm/px to train at (images with a known µm/px are resampled to it)
    image_mpp: dict[str, float] = field(default_factory=dict)  # {filename glob: µm/px}
    samples_per_epoch: int | None = None  # default: tiles needed to cover the training images once
    # ---- model
    base_channels: int = 64
    depth: int = 4
    padding: str = "valid"
    batch_norm: bool = False
    up_mode: str = "transpose"
    normalize_inputs: bool = True  # per-channel mean/std of the training images, stored in the model
    # ---- optimisation
    epochs: int = 10
    batch_size: int = 1
    output_size: int = 388  # training patch output side (rounded up to a valid size); input = + 2 halo
    optimizer: str = "adam"  # adam | sgd
    lr: float | None = None  # default: 1e-3 (adam) / 1e-2 (sgd)
    momentum: float = 0.99
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # constant | cosine
    weight_map: bool = True  # border weight w0 * exp(-(d1 + d2)^2 / 2 sigma^2)
    class_balance: bool = True  # w_c
    w0: float = 10.0
    sigma: float = 5.0
    contact_weight: bool = False  # the border weight also on object pixels touching another object
    # ---- augmentation
    flips: bool = True
    elastic: bool = False
    elastic_grid: int = 3
    elastic_sigma: float = 10.0
    stain_jitter: bool = False  # H&E colour augmentation (RGB data)
    intensity_jitter: bool = True
    scale_range: tuple[float, float] | None = None  # zoom drawn log-uniformly in [low, high] for half the patches
    blur: float = 0.0  # max Gaussian sigma in px, applied to a quarter of the patches (0: off)
    jpeg: tuple[int, int] | None = None  # JPEG quality range, re-encoding a quarter of the patches (None: off)
    # ---- execution
    amp: str = "auto"  # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    loader_workers: int = 2
    cpus_per_worker: int = 1
    seed: int = 0
    val_tile: int = 256
    validate_every: int = 1  # validate every N epochs and at the last (0: never)
    best_metric: str = "val_dice"
    # ---- outputs
    run_dir: str | None = None  # storage_path/name: best-model.pt and metrics.jsonl go here
    class_names: list[str] | None = None
    local_mode: bool = False  # num_workers=0: Ray Train runs the loop in-process and keeps no checkpoints
    max_steps_per_epoch: int | None = None  # for quick tests

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        if self.best_metric not in METRIC_MODES:
            raise ValueError(f"best_metric must be one of {sorted(METRIC_MODES)}, got {self.best_metric!r}")
        if not self.data and not self.slides:
            raise ValueError("no training data: give at least one data folder or slide")
        if not 0 <= self.negative_fraction < 1:
            raise ValueError(f"negative_fraction must lie in [0, 1), got {self.negative_fraction}")
        _ = self.rim  # validates boundary_width, contact_width and core
        self.scale_range = tuple(self.scale_range) if self.scale_range else None
        self.jpeg = tuple(self.jpeg) if self.jpeg else None
        self.negatives = [list(pair) for pair in self.negatives]
        self.slides = [list(pair) for pair in self.slides]
        self.val_slides = [list(pair) for pair in self.val_slides]

    @property
    def rim(self) -> Rim:
        """The boundary class's geometry (:class:`~pipeline.training.files.Rim`)."""
        return Rim(self.boundary_width, self.contact_width, self.core)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.optimizer == "adam" else 1e-2)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**values)
