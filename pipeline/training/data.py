"""Training patches cut with the inference geometry: input = output + 2 * halo, mirrored outside the image.

A :class:`PatchDataset` draws ``samples_per_epoch`` patches per epoch from its sources:

* :class:`ImagePatchSource`: an image/label pair in memory (a folder data set), sampled uniformly;
* :class:`SlidePatchSource`: a whole slide (any format ``pipeline.slides.pyramid.open_slide`` reads) with a label
  mask (Zarr or image, same size as the slide level), sampled around tissue (``pipeline.slides.tissue``).

Every window is read with ``pipeline.slides.sources.read_window`` (numpy "symmetric" mirroring, as inference does),
augmented (symmetries, elastic deformation, colour), and turned into ``(input (C, I, I) float32 in [0, 1],
target (O, O) int64, weight (O, O) float32)``. Sample ``index`` of epoch ``e`` is ``e * len + i``
(see :class:`EpochSampler`) and its random draws come from ``default_rng([seed, e, i])``: reproducible,
and different every epoch even with persistent DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pipeline.slides.sources import read_region, read_window
from pipeline.training import augment
from pipeline.training.files import ImageRecord, Rim, read_label, to_classes, to_instances
from pipeline.training.weights import weight_map


@dataclass(frozen=True)
class PatchGeometry:
    """Patch sizes of a model: ``input_size`` = ``output_size`` + 2 * ``halo`` for a valid U-Net."""

    input_size: int
    output_size: int
    halo: int

    @classmethod
    def for_model(cls, model, output_size: int) -> "PatchGeometry":
        out = model.valid_output_size(output_size)
        size_in = model.input_size_for(out)
        return cls(size_in, out, (size_in - out) // 2)


@dataclass(frozen=True)
class SampleSpec:
    """How raw labels become targets and weights, and which augmentations run."""

    label_mode: str
    num_classes: int
    class_weights: tuple[float, ...] | None = None
    border: bool = True
    w0: float = 10.0
    sigma: float = 5.0
    contact_weight: bool = False
    flips: bool = True
    elastic: bool = False
    elastic_grid: int = 3
    elastic_sigma: float = 10.0
    stain_jitter: bool = False
    intensity_jitter: bool = True
    rim: Rim = Rim()
    scale_range: tuple[float, float] | None = None
    blur: float = 0.0
    jpeg: tuple[int, int] | None = None

    def margin(self, halo: int) -> int:
        """Extra context read around the input window: for the border weights of pixels near the
        output's edge (objects up to 6 sigma away) and for elastic displacements."""
        need = 0
        if self.border and self.w0 > 0:
            need = max(need, math.ceil(6 * self.sigma) - halo)
        if self.elastic:
            need = max(need, math.ceil(3 * self.elastic_sigma))
        return max(0, need)


def cut_sample(
    image: Any, label: Any, y: int, x: int, geometry: PatchGeometry, spec: SampleSpec, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The patch whose *output* window starts at (y, x): (C, I, I) float32, (O, O) int64, (O, O) float32.

    ``image``: (H, W, C) uint8 array-like; ``label``: (H, W) raw labels; both are read through
    ``read_window`` so everything outside the image is mirrored exactly as at inference.
    """
    size_in, size_out, halo = geometry.input_size, geometry.output_size, geometry.halo
    m = spec.margin(halo)
    window = size_in + 2 * m
    read = max(1, round(window / augment.draw_zoom(rng, spec.scale_range)))  # the same centre, a larger or smaller area
    oy, ox = y - halo - m + (window - read) // 2, x - halo - m + (window - read) // 2
    pixels = read_window(image, oy, ox, read)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    raw = read_window(label, oy, ox, read)
    if spec.flips:
        pixels, raw = augment.flip_rotate([pixels, raw], int(rng.integers(8)))
    pixels, raw = augment.zoom(pixels.astype(np.float32) / 255.0, raw, window)
    if spec.elastic:
        field = augment.elastic_field((window, window), rng, spec.elastic_grid, spec.elastic_sigma)
        raw = augment.warp(raw, field, order=0)
        pixels = augment.warp(pixels, field[:, m : m + size_in, m : m + size_in], order=3, offset=m)
        pixels = np.clip(pixels, 0.0, 1.0)
    else:
        pixels = pixels[m : m + size_in, m : m + size_in]
    classes = to_classes(raw, spec.label_mode, spec.num_classes, spec.rim)
    # border weights need every object within 6 sigma of the output: compute them on that region only
    start = m + halo
    reach = min(start, math.ceil(6 * spec.sigma)) if spec.border else 0
    region = slice(start - reach, start + size_out + reach)
    instances = to_instances(raw, spec.label_mode, classes)[region, region] if spec.border and spec.w0 > 0 else None
    weights = weight_map(
        classes[region, region], instances, spec.class_weights, spec.w0, spec.sigma,
        border=spec.border and spec.w0 > 0, contact=spec.contact_weight,
    )[reach : reach + size_out, reach : reach + size_out]
    target = classes[start : start + size_out, start : start + size_out]
    if pixels.shape[-1] == 3 and spec.stain_jitter:
        pixels = augment.stain_jitter(pixels, rng)
    elif spec.intensity_jitter:
        pixels = augment.intensity_jitter(pixels, rng)
    pixels = augment.jpeg(np.clip(augment.blur(pixels, rng, spec.blur), 0.0, 1.0), rng, spec.jpeg)
    return (
        np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32),
        np.ascontiguousarray(target, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float32),
    )


class ImagePatchSource:
    """An in-memory image/label pair; output windows are drawn uniformly over the image."""

    def __init__(self, record: ImageRecord):
        self.name, self.image, self.label = record.name, record.image, record.label
        self.shape = record.image.shape[:2]

    @property
    def area(self) -> int:
        return int(self.shape[0] * self.shape[1])

    def tiles(self, output_size: int) -> int:
        return math.ceil(self.shape[0] / output_size) * math.ceil(self.shape[1] / output_size)

    def sample_origin(self, rng: np.random.Generator, output_size: int) -> tuple[int, int]:
        return tuple(int(rng.integers(0, max(0, side - output_size) + 1)) for side in self.shape)  # type: ignore[return-value]


def open_label_mask(path_or_array: Any) -> Any:
    """A label mask as an array-like: numpy arrays as is, Zarr (array, or group level "0") lazily,
    images (PNG/TIFF) read into memory."""
    if not isinstance(path_or_array, (str, Path)):
        return np.asarray(path_or_array) if not hasattr(path_or_array, "shape") else path_or_array
    path = Path(path_or_array)
    if path.is_dir() or path.suffix == ".zarr":
        import zarr

        node = zarr.open(str(path), mode="r")
        if not isinstance(node, zarr.Array):
            node = node["0"]
        if len(node.shape) == 3:
            raise ValueError(f"{path}: a label mask must be 2-D (H, W), got {node.shape}")
        return node
    return read_label(path)


class SlidePatchSource:
    """A whole slide and its label mask; output windows are centred on random tissue pixels.

    Tissue comes from ``pipeline.slides.tissue.tissue_mask`` on a thumbnail, joined with the labelled area (so
    annotated objects are always candidates); with no tissue found the whole slide is sampled uniformly.
    """

    def __init__(self, slide: Any, label: Any, level: int = 0, thumbnail_side: int = 1024, tissue: bool = True):
        from pipeline.slides.pyramid import open_slide

        self.image = open_slide(slide, level)
        self.label = open_label_mask(label)
        self.name = self.image.name
        self.shape = self.image.size
        if tuple(self.label.shape[:2]) != tuple(self.shape):
            raise ValueError(f"{self.name}: label mask {tuple(self.label.shape)} does not match the slide {self.shape}")
        self.candidates, self.scale = self._tissue_pixels(thumbnail_side, tissue)

    def _tissue_pixels(self, side: int, tissue: bool) -> tuple[np.ndarray, tuple[float, float]]:
        thumb = self.image.thumbnail(side)
        scale = (thumb.shape[0] / self.shape[0], thumb.shape[1] / self.shape[1])
        mask = np.zeros(thumb.shape[:2], bool)
        if tissue and thumb.shape[-1] in (3, 4):
            from pipeline.slides.tissue import tissue_mask

            mask |= tissue_mask(thumb)
        step_y, step_x = max(1, round(1 / scale[0])), max(1, round(1 / scale[1]))
        labelled = np.asarray(self.label[::step_y, ::step_x]) > 0
        h, w = min(mask.shape[0], labelled.shape[0]), min(mask.shape[1], labelled.shape[1])
        mask[:h, :w] |= labelled[:h, :w]
        return np.argwhere(mask), scale

    @property
    def area(self) -> int:
        return int(len(self.candidates) / (self.scale[0] * self.scale[1])) or int(self.shape[0] * self.shape[1])

    def tiles(self, output_size: int) -> int:
        return max(1, math.ceil(self.area / output_size**2))

    def sample_origin(self, rng: np.random.Generator, output_size: int) -> tuple[int, int]:
        if len(self.candidates) == 0:
            return tuple(int(rng.integers(0, max(0, s - output_size) + 1)) for s in self.shape)  # type: ignore[return-value]
        ty, tx = self.candidates[int(rng.integers(len(self.candidates)))]
        cy = (ty + rng.random()) / self.scale[0]
        cx = (tx + rng.random()) / self.scale[1]
        return int(cy) - output_size // 2, int(cx) - output_size // 2


class NegativePatchSource:
    """A region of a real slide marked by hand as holding no object (keratin, stroma edges, marking ink,
    background): every output pixel is background. Hard negatives: what a model trained on object-rich tiles
    alone calls "nucleus". The region is read with ``context`` px of its real surroundings, so input windows
    see what they would see at inference; output windows stay inside the region."""

    negative = True

    def __init__(self, slide: str | Path, region: Any, context: int, mpp: float | None = None):
        from pipeline.slides.pyramid import open_slide
        from pipeline.slides.sources import ResampledSource

        source = open_slide(slide, 0)
        factor = 1.0
        if mpp is not None and source.mpp and abs(mpp / source.mpp - 1) > 0.05:
            factor = mpp / source.mpp
            source = ResampledSource(source, factor)
        y0, x0, y1, x1 = (round(v / factor) for v in region.box)  # a hard_negatives.Region
        self.name = f"{source.name}#{region.name}"
        self.inner = (y1 - y0, x1 - x0)
        self.context = context
        self.image = read_region(source, y0 - context, x0 - context, y1 - y0 + 2 * context, x1 - x0 + 2 * context)
        self.label = np.zeros(self.image.shape[:2], dtype=np.uint16)
        self.shape = self.image.shape[:2]

    @property
    def area(self) -> int:
        return int(self.inner[0] * self.inner[1])

    def tiles(self, output_size: int) -> int:
        return math.ceil(self.inner[0] / output_size) * math.ceil(self.inner[1] / output_size)

    def sample_origin(self, rng: np.random.Generator, output_size: int) -> tuple[int, int]:
        return tuple(self.context + int(rng.integers(0, max(0, side - output_size) + 1)) for side in self.inner)  # type: ignore[return-value]


class PatchDataset(Dataset):
    """``samples_per_epoch`` random patches per epoch; sources are picked in proportion to their area, except
    hard negatives (sources with ``negative = True``), which together get ``negative_fraction`` of the draws."""

    def __init__(
        self,
        sources: list,
        geometry: PatchGeometry,
        spec: SampleSpec,
        samples_per_epoch: int | None = None,
        seed: int = 0,
        negative_fraction: float = 0.0,
    ):
        if not sources:
            raise ValueError("PatchDataset needs at least one source")
        self.sources, self.geometry, self.spec, self.seed = sources, geometry, spec, seed
        negative = np.array([getattr(s, "negative", False) for s in sources])
        fraction = negative_fraction if negative.any() and not negative.all() else float(negative.all())
        tiles = np.array([s.tiles(geometry.output_size) for s in sources])
        covering = tiles[~negative].sum() / (1 - fraction) if fraction < 1 else tiles.sum()  # the positives once
        self.samples = samples_per_epoch or max(1, round(covering))
        areas = np.array([s.area for s in sources], dtype=np.float64)
        group_area = np.where(negative, areas[negative].sum(), areas[~negative].sum())
        self.probabilities = areas / group_area * np.where(negative, fraction, 1 - fraction)
        self.probabilities /= self.probabilities.sum()

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        epoch, item = divmod(int(index), self.samples)
        rng = np.random.default_rng([self.seed, epoch, item])
        source = self.sources[int(rng.choice(len(self.sources), p=self.probabilities))]
        y, x = source.sample_origin(rng, self.geometry.output_size)
        inputs, target, weights = cut_sample(source.image, source.label, y, x, self.geometry, self.spec, rng)
        return torch.from_numpy(inputs), torch.from_numpy(target), torch.from_numpy(weights)


class EpochSampler(Sampler[int]):
    """This rank's share of a shuffled epoch, as indices ``epoch * n + i`` (see :class:`PatchDataset`).

    Every rank yields the same number of indices (the permutation is padded by wrapping), so DDP ranks
    run the same number of steps; call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = n, rank, world_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world)

    def __iter__(self) -> Iterator[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        total = len(self) * self.world
        order = np.resize(order, total)  # wraps around to pad
        return iter((self.epoch * self.n + order[self.rank :: self.world]).tolist())


def class_counts(labels: list[Any], label_mode: str, num_classes: int, max_pixels: int = 1 << 22,
                 rim: Rim = Rim()) -> np.ndarray:  # fmt: skip
    """Pixels per class over label images (large array-likes are subsampled on a regular grid)."""
    counts = np.zeros(num_classes, dtype=np.int64)
    for label in labels:
        step = max(1, int(math.sqrt(label.shape[0] * label.shape[1] / max_pixels)))
        classes = to_classes(np.asarray(label[::step, ::step]), label_mode, num_classes,
                             rim if step == 1 else Rim())  # a subsampled image has no rim to measure
        counts += np.bincount(classes.ravel(), minlength=num_classes)[:num_classes]
    return counts


def channel_stats(images: list[Any], max_pixels: int = 1 << 22) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1] (large images subsampled)."""
    sums, squares, count = None, None, 0
    for image in images:
        step = max(1, int(math.sqrt(image.shape[0] * image.shape[1] / max_pixels)))
        block = np.asarray(image[::step, ::step]).astype(np.float64) / 255.0
        block = block.reshape(-1, block.shape[-1] if block.ndim == 3 else 1)
        sums = block.sum(0) if sums is None else sums + block.sum(0)
        squares = (block**2).sum(0) if squares is None else squares + (block**2).sum(0)
        count += block.shape[0]
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-8))
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(max(v, 1e-3)), 4) for v in std)
