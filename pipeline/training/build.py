"""From a :class:`TrainConfig` to the model, the training patches and the validation regions.

Every Ray Train worker calls :func:`build_data` and gets the same result (file order and every random
choice are seeded), so all ranks agree on the model architecture and input normalisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unet.model import UNet, UNetConfig
from pipeline.training.config import TrainConfig
from pipeline.training.data import (
    ImagePatchSource,
    NegativePatchSource,
    PatchDataset,
    PatchGeometry,
    SampleSpec,
    SlidePatchSource,
    channel_stats,
    class_counts,
)
from pipeline.training.evaluate import ValItem
from pipeline.training.files import detect_label_mode, folder_pairs, load_records, split_names
from pipeline.training.weights import class_balance_weights

logger = logging.getLogger(__name__)


@dataclass
class TrainingData:
    train_sources: list
    val_items: list[ValItem]
    in_channels: int
    num_classes: int
    label_mode: str
    class_weights: tuple[float, ...] | None
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    train_names: list[str] = field(default_factory=list)
    val_names: list[str] = field(default_factory=list)


def build_data(cfg: TrainConfig) -> TrainingData:
    """Load folders (split into train/validation) and open slides; derive label mode, classes, weights."""
    pairs = [pair for folder in cfg.data for pair in folder_pairs(folder)]
    records = load_records(pairs, cfg.image_mpp, cfg.mpp)
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError("two training images share a file name; names must be unique across --data folders")
    val_records = load_records([p for folder in cfg.val_data for p in folder_pairs(folder)], cfg.image_mpp, cfg.mpp)
    if val_records or cfg.val_slides:
        train_names, val_names = (names, []) if not cfg.val_files else split_names(names, cfg.val_files, 0.0, cfg.seed)
    else:
        train_names, val_names = split_names(names, cfg.val_files, cfg.val_split, cfg.seed) if names else ([], [])
    train_records = [r for r in records if r.name in train_names]
    val_records += [r for r in records if r.name in val_names]
    slides = [SlidePatchSource(s, l, cfg.slide_level) for s, l in cfg.slides]
    val_slides = [SlidePatchSource(s, l, cfg.slide_level) for s, l in cfg.val_slides]

    label_mode = cfg.label_mode
    if label_mode == "auto":
        labels = [r.label for r in train_records + val_records] or [_label_sample(s) for s in slides]
        label_mode = detect_label_mode(labels)
    if cfg.boundary_width and label_mode != "instances":
        raise ValueError(f"boundary_width needs instance labels (0 = background, k = object k), got {label_mode} labels")
    num_classes = cfg.num_classes or (3 if cfg.boundary_width else _num_classes(label_mode, train_records, slides))
    channels = {r.image.shape[2] for r in train_records + val_records} | {s.image.shape[2] for s in slides + val_slides}
    if len(channels) != 1:
        raise ValueError(f"images have different channel counts {sorted(channels)}; use one kind of image per run")
    in_channels = channels.pop()

    weights = None
    if cfg.class_balance:
        labels = [r.label for r in train_records] + [s.label for s in slides]
        counts = class_counts(labels, label_mode, num_classes, rim=cfg.rim)
        if cfg.boundary_width:  # the rim is the object's edge: balanced as its own (rarer) class, a missed rim pixel
            # would cost far more than a false one outside, and predicted nuclei would swell
            background, objects = class_balance_weights(np.array([counts[0], counts[1:].sum()]))
            weights = (float(background), float(objects), float(objects))
        else:
            weights = tuple(float(w) for w in class_balance_weights(counts))
    if cfg.normalize_inputs:
        images = [r.image for r in train_records] + [s.image.thumbnail(1024) for s in slides]
        mean, std = channel_stats(images)
    else:
        mean, std = (0.5,), (0.5,)
    negatives = negative_sources(cfg)
    sources = [ImagePatchSource(r) for r in train_records] + slides + negatives
    val_items = [ValItem(r.name, r.image, r.label, (0, 0, *r.image.shape[:2])) for r in val_records]
    val_items += _slide_val_items(val_slides, cfg.val_tile, cfg.val_tiles_per_slide, cfg.seed)
    logger.info(
        "data: %d training images + %d slides + %d hard-negative regions, %d validation regions; label mode %s, %d "
        "classes, class weights %s", len(train_records), len(slides), len(negatives), len(val_items), label_mode,
        num_classes, weights,
    )  # fmt: skip
    return TrainingData(
        sources, val_items, in_channels, num_classes, label_mode, weights, mean, std,
        [r.name for r in train_records] + [s.name for s in slides], [v.name for v in val_items],
    )  # fmt: skip


def build_model(cfg: TrainConfig, data: TrainingData) -> UNet:
    return UNet(
        UNetConfig(
            in_channels=data.in_channels, num_classes=data.num_classes, base_channels=cfg.base_channels, depth=cfg.depth,
            padding=cfg.padding, batch_norm=cfg.batch_norm, up_mode=cfg.up_mode,
            input_mean=data.input_mean, input_std=data.input_std,
        )
    )  # fmt: skip


def build_dataset(cfg: TrainConfig, data: TrainingData, model: UNet) -> PatchDataset:
    geometry = PatchGeometry.for_model(model, cfg.output_size)
    spec = SampleSpec(
        label_mode=data.label_mode, num_classes=data.num_classes, class_weights=data.class_weights,
        border=cfg.weight_map, w0=cfg.w0, sigma=cfg.sigma, contact_weight=cfg.contact_weight, flips=cfg.flips, elastic=cfg.elastic,
        elastic_grid=cfg.elastic_grid, elastic_sigma=cfg.elastic_sigma, stain_jitter=cfg.stain_jitter,
        intensity_jitter=cfg.intensity_jitter, rim=cfg.rim, scale_range=cfg.scale_range,
        blur=cfg.blur, jpeg=cfg.jpeg,
    )  # fmt: skip
    return PatchDataset(data.train_sources, geometry, spec, cfg.samples_per_epoch, cfg.seed, cfg.negative_fraction)


def negative_sources(cfg: TrainConfig, context: int = 160) -> list[NegativePatchSource]:
    """The "train" regions of every hard-negatives file (``cfg.negatives``: [slide, regions.json] pairs), read
    at the training µm/px with ``context`` px around each (the input halo, elastic margin and zoom)."""
    from pipeline.training.hard_negatives import load_hard_negatives

    return [
        NegativePatchSource(slide, region, context, cfg.mpp)
        for slide, regions in cfg.negatives
        for entry in load_hard_negatives(regions, Path(slide).parent)
        for region in entry.regions
        if region.split == "train"
    ]


def _label_sample(source: SlidePatchSource) -> np.ndarray:
    step = max(1, max(source.shape) // 2048)
    return np.asarray(source.label[::step, ::step])


def _num_classes(label_mode: str, records: list, slides: list) -> int:
    if label_mode in ("binary", "instances"):
        return 2
    top = max([int(r.label.max(initial=0)) for r in records] + [int(_label_sample(s).max(initial=0)) for s in slides])
    return max(2, top + 1)


def _slide_val_items(slides: list[SlidePatchSource], tile: int, per_slide: int, seed: int) -> list[ValItem]:
    rng = np.random.default_rng([seed, 1])
    items = []
    for slide in slides:
        for k in range(per_slide):
            y, x = slide.sample_origin(rng, tile)
            y = int(np.clip(y, 0, max(0, slide.shape[0] - tile)))
            x = int(np.clip(x, 0, max(0, slide.shape[1] - tile)))
            box = (y, x, min(tile, slide.shape[0] - y), min(tile, slide.shape[1] - x))
            items.append(ValItem(f"{slide.name}#{k}", slide.image, slide.label, box))
    return items
