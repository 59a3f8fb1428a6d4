"""Slide views: what a run reads, one lazy, picklable (H, W, C) uint8 image with ``read(y0, y1, x0, x1)``.

A view is one level of a slide's pyramid (:mod:`pipeline.slides.pyramid` opens files), an in-memory array
(:class:`ArraySource`) or a resampled view of another view (:class:`ResampledSource`). Views hold no file
handles (those are opened once per process and cached), so they ship to Ray workers by value.
``read_window`` cuts a tile's input window with numpy ``"symmetric"`` mirroring outside the slide;
``to_dask`` wraps a view as a lazy Dask array.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.slides.geometry import window_source

if TYPE_CHECKING:  # dask is imported where it is used: workers that only read tiles start ~1 s sooner
    import dask.array as da

logger = logging.getLogger(__name__)


class SlideError(ValueError):
    """A slide that cannot be opened or read; the message names the file and what to do."""


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name) or ""
    try:
        return float(text) if text else default
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not a number; unset it or give a number") from None


@dataclass(frozen=True)
class SlideLimits:
    """Caps that stop one absurd or hostile slide (a 140-byte file can claim 10^6 x 10^6 px) before it costs
    memory: checked after opening, before the thumbnail, the tile list or the store. The largest real slides
    are about 20 gigapixels (200k x 100k px at 0.25 µm/px); the defaults leave 3x room. Raise them with
    ``--max-gigapixels`` / ``--max-tiles`` or ``WSI_MAX_GIGAPIXELS`` / ``WSI_MAX_TILES``."""

    max_gigapixels: float = field(default_factory=lambda: _env_number("WSI_MAX_GIGAPIXELS", 64))
    max_tiles: int = field(default_factory=lambda: int(_env_number("WSI_MAX_TILES", 1_000_000)))

    def check(self, name: str, size: tuple[int, int], tiles: int) -> None:
        """SlideError when a slide of ``size`` (h, w) at the segmented level, cut into ``tiles``, exceeds a cap."""
        gigapixels = size[0] * size[1] / 1e9
        if gigapixels > self.max_gigapixels:
            raise SlideError(
                f"{name}: {size[1]}x{size[0]} px ({gigapixels:,.0f} gigapixels) at the level to segment, more than the "
                f"{self.max_gigapixels:g} allowed; if the slide is real, raise --max-gigapixels, else the file's "
                "header is wrong or hostile"
            )
        if tiles > self.max_tiles:
            raise SlideError(
                f"{name}: {tiles:,} tiles at this level and tile size, more than the {self.max_tiles:,} allowed; "
                "use a larger --tile-size or a coarser --level/--mpp, or raise --max-tiles"
            )


class SlideSource:
    """Base class: subclasses set ``shape`` (H, W, C), ``name``, ``level``, ``mpp`` and implement ``_read``.

    ``level0_downsample``: level-0 pixels per pixel of this view (review tools address slides in level-0
    pixels; a store records it so that exported objects land on the slide). ``pixels``: how they are read."""

    shape: tuple[int, int, int]
    name: str = "array"
    path: str | None = None
    level: int = 0
    mpp: float | None = None
    level0_downsample: float = 1.0
    pixels: str = "array"  # where the pixels come from and how they are read (provenance)
    dtype = np.dtype(np.uint8)
    ndim = 3

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the slide) as an (h, w, C) uint8 array."""
        try:
            return self._read(y0, y1, x0, x1)
        except SlideError:
            raise
        except Exception as error:
            raise SlideError(
                f"{self.path or self.name}: reading level {self.level} region y={y0}:{y1} x={x0}:{x1} failed "
                f"({type(error).__name__}: {error}); the file may be corrupt: re-export or re-scan it"
            ) from error

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """Slicing for Dask's ``from_array``: basic slices only."""
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.read(y0, y1, x0, x1)
        return block[(slice(None), slice(None)) + tuple(key[2:])] if len(key) > 2 else block

    def read_window(self, y: int, x: int, size: int) -> np.ndarray:
        """A size x size window at (y, x), possibly outside the slide, mirrored as np.pad "symmetric"."""
        return read_region(self, y, x, size, size)

    def read_region(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """A height x width region at (y, x), possibly outside the slide, mirrored as np.pad "symmetric"."""
        return read_region(self, y, x, height, width)

    def to_dask(self, chunk: int = 2048) -> da.Array:
        """The whole level as a lazy Dask array, (H, W, C) in ``chunk``-sized blocks."""
        import dask.array as da

        return da.from_array(self, chunks=(chunk, chunk, self.shape[2]), asarray=False, lock=False, fancy=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole view with its longer side at most ``max_side`` (area-filtered)."""
        return downscale(self, fit_within(self.size, max_side))


def fit_within(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so its longer side is at most ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def downscale(source: SlideSource, size: tuple[int, int], block: int = 2048) -> np.ndarray:
    """``source`` resized to ``size`` (h, w) with a Lanczos filter, as OpenSlide's thumbnails are.

    A source more than 4x larger than ``size`` per side is first sampled with a stride (in blocks, in
    threads), so memory holds about 4x the result whatever the source's size."""
    from PIL import Image

    height, width = source.size
    step = max(1, min(height // size[0], width // size[1]) // 2)
    if step == 1:
        image = source.read(0, height, 0, width)
    else:
        span = step * -(-block // step)  # a block side that is a multiple of the stride
        image = np.empty((-(-height // step), -(-width // step), source.shape[2]), np.uint8)

        def sample(origin: tuple[int, int]) -> None:
            y0, x0 = origin
            part = source.read(y0, min(height, y0 + span), x0, min(width, x0 + span))[::step, ::step]
            image[y0 // step : y0 // step + part.shape[0], x0 // step : x0 // step + part.shape[1]] = part

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(sample, [(y, x) for y in range(0, height, span) for x in range(0, width, span)]))
    if image.shape[:2] == tuple(size):
        return image
    grey = image.shape[2] == 1
    picture = Image.fromarray(image[..., 0] if grey else image[..., :3])
    resized = np.asarray(picture.resize((size[1], size[0]), Image.Resampling.LANCZOS))
    return resized[..., None] if grey else resized


def read_window(array: Any, y: int, x: int, size: int) -> np.ndarray:
    """Mirrored ``size`` x ``size`` window from any (H, W[, C]) array-like (see :func:`read_region`)."""
    return read_region(array, y, x, size, size)


def read_region(array: Any, y: int, x: int, height: int, width: int) -> np.ndarray:
    """Mirrored region from any (H, W[, C]) array-like supporting 2-D slicing (source, numpy, zarr, dask).

    Pixels outside the array are numpy ``"symmetric"`` mirror images, so any window cut from the region
    equals that window read on its own. Only the source span the region needs is read, once; interior
    regions are plain slices.
    """
    ylo, yhi, yidx = window_source(y, height, array.shape[0])
    xlo, xhi, xidx = window_source(x, width, array.shape[1])
    block = array[ylo:yhi, xlo:xhi]
    if hasattr(block, "compute"):
        block = block.compute()
    block = np.asarray(block)
    if yhi - ylo == height and (yidx == np.arange(height)).all() and xhi - xlo == width and (xidx == np.arange(width)).all():
        return block
    return block[yidx][:, xidx]


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over a white background (OpenSlide returns transparent pixels outside scanned areas)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


def to_uint8_advice(dtype: Any) -> str:
    """How to make 8-bit pixels from ``dtype`` (one clause, for error messages)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return "scale it to 0-255 first, e.g. np.clip(np.rint(x * 255), 0, 255).astype(np.uint8) for values in [0, 1]"
    if dtype.kind in "ui" and dtype.itemsize > 1:
        bits = 8 * dtype.itemsize
        return (
            f"rescale its {bits}-bit range to 8 bits first, e.g. (x >> {bits - 8}).astype(np.uint8) for full-range "
            "data, or np.clip(x * (255 / x.max()), 0, 255).astype(np.uint8) for 10- to 14-bit data"
        )
    if dtype.kind == "b":
        return "a boolean image is a mask, not a slide: pass the slide itself"
    return "convert it to 8-bit RGB first"


# --------------------------------------------------------------------------- views that are not file levels
class ArraySource(SlideSource):
    """An in-memory numpy array, a zarr array or a Dask array of shape (H, W) or (H, W, C)."""

    def __init__(self, array: Any, name: str = "array", mpp: float | None = None):
        if array.ndim not in (2, 3):
            raise SlideError(f"{name}: expected an (H, W) or (H, W, C) image, got shape {array.shape}")
        if np.dtype(array.dtype) != np.uint8:
            raise SlideError(f"{name}: {array.dtype} pixels, the model reads uint8; {to_uint8_advice(array.dtype)}")
        self.array, self.name, self.mpp = array, name, mpp
        channels = array.shape[2] if array.ndim == 3 else 1
        self.shape = (int(array.shape[0]), int(array.shape[1]), int(channels))

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = self.array[y0:y1, x0:x1]
        if hasattr(block, "compute"):
            block = block.compute()
        block = np.asarray(block)
        return block[..., None] if block.ndim == 2 else block


class ResampledSource(SlideSource):
    """``base`` scaled by 1 / ``factor`` (factor = target µm/px / base µm/px).

    Each output pixel is a fixed function of fixed base pixels, evaluated in the same order whatever the
    region asked for, so a region read equals the same region of the whole resampled image and overlap
    tiling stays exact on it. One separable triangle filter (:func:`resample_separable`): up to 2x smaller,
    bilinear at pixel centres (at 2x exactly a 2 x 2 mean); beyond 2x, half-width ``factor / 2``. ``shape`` fixes the size (a
    pyramid level's own), otherwise floor(base size / factor); ``level`` names the level it stands for.
    """

    def __init__(self, base: SlideSource, factor: float, shape: tuple[int, int] | None = None,
                 level: int | None = None):  # fmt: skip
        self.base, self.factor = base, float(factor)
        self.path, self.name = base.path, base.name
        self.level = base.level if level is None else level
        self.mpp = base.mpp * self.factor if base.mpp else None
        self.level0_downsample = base.level0_downsample * self.factor
        self.pixels = f"{base.pixels}, resampled by {self.factor:.6g} (separable triangle filter)"
        height, width, channels = base.shape
        if shape is None:
            shape = (max(1, math.floor(height / factor)), max(1, math.floor(width / factor)))
        self.shape = (int(shape[0]), int(shape[1]), channels)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The base's thumbnail (same area, same pyramid) at this view's aspect."""
        return self.base.thumbnail(max_side)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.factor == 2.0:  # every sample midway between 2 x 2 pixels: the filter is their mean
            return mean_2x2(self.base.read(2 * y0, 2 * y1, 2 * x0, 2 * x1))
        (ys, wy), (xs, wx) = self._taps(y0, y1, self.base.size[0]), self._taps(x0, x1, self.base.size[1])
        by0, bx0 = int(ys.min()), int(xs.min())
        block = self.base.read(by0, int(ys.max()) + 1, bx0, int(xs.max()) + 1)
        return resample_separable(block, ys - by0, wy, xs - bx0, wx)

    def _taps(self, start: int, stop: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Base indices (n, K) and weights (n, K) of the triangle filter for outputs start..stop-1.

        Half-width 1 up to 2x (bilinear at pixel centres: at exactly 2x a 2 x 2 mean), ``factor / 2`` beyond
        (bilinear alone would skip pixels and alias); indices past the edge repeat it. The first tap that
        could be used has weight > 0 only from ``floor(centre) - ceil(half) + 1``, so no tap is wasted."""
        half = max(1.0, self.factor / 2)
        centres = (np.arange(start, stop) + 0.5) * self.factor - 0.5
        offsets = np.arange(1 - math.ceil(half), math.ceil(half) + 1)
        index = np.floor(centres)[:, None].astype(np.int64) + offsets[None, :]
        weight = np.maximum(0.0, 1 - np.abs(index - centres[:, None]) / half).astype(np.float32)
        weight /= weight.sum(axis=1, keepdims=True)
        return np.clip(index, 0, length - 1), weight


def mean_2x2(block: np.ndarray) -> np.ndarray:
    """(2h, 2w, C) uint8 -> (h, w, C): the mean of each 2 x 2 block, rounded half to even, in integers.

    Bit-identical to :func:`resample_separable` at factor 2 (weights 1/2 and 1/2 per axis: the float32 sum
    is exactly total / 4, then ``np.rint``), at a fraction of its cost. Rows are summed first (whole rows,
    contiguous), then neighbouring pixels of each row: 2.4x faster than four strided 2 x 2 picks, which cost
    a resampled shard 3.5x its JPEG decoding (docs/performance.md)."""
    height, width, channels = block.shape[0] // 2, block.shape[1] // 2, block.shape[2]
    rows = np.add(block[0::2], block[1::2], dtype=np.uint16).reshape(height, width, 2 * channels)
    total = rows[:, :, :channels] + rows[:, :, channels:]
    rounded = total >> 2
    rounded &= 1  # remainders 0, 1 down; 3 up; 2 to the even
    rounded += 1
    rounded += total
    rounded >>= 2
    return rounded.astype(np.uint8)


def resample_separable(block: np.ndarray, ys: np.ndarray, wy: np.ndarray, xs: np.ndarray, wx: np.ndarray) -> np.ndarray:
    """uint8 ``block`` filtered along rows then columns: out[i, j] = sum_k wx[j, k] * sum_l wy[i, l] * block[ys[i, l], xs[j, k]].

    Each output pixel is the same float32 sum in the same order whatever the region (ufuncs work element by
    element), so a region equals the same region of the whole resampled image."""
    rows = np.multiply(block[ys[:, 0]], wy[:, 0, None, None], dtype=np.float32)
    for k in range(1, ys.shape[1]):
        rows += block[ys[:, k]] * wy[:, k, None, None]
    out = rows[:, xs[:, 0]] * wx[None, :, 0, None]
    for k in range(1, xs.shape[1]):
        out += rows[:, xs[:, k]] * wx[None, :, k, None]
    return np.clip(np.rint(out, out=out), 0, 255).astype(np.uint8)
