"""Slide access: one lazy, picklable view of a slide at one pyramid level, whatever the file format.

Every source is an array-like of shape (H, W, C) uint8 with ``read(y0, y1, x0, x1)``; file handles are
opened lazily once per process and cached (OpenSlide handles cannot be pickled), so a source can be
shipped to Ray workers by value. ``read_window`` cuts a tile's input window with numpy ``"symmetric"``
mirroring outside the slide, and ``to_dask`` wraps the source as a lazy Dask array.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.geometry import TileGrid, Tile, window_source

if TYPE_CHECKING:  # dask is imported where it is used: workers that only read tiles start ~1 s sooner
    import dask.array as da

logger = logging.getLogger(__name__)


class SlideError(ValueError):
    """A slide that cannot be opened or read; the message names the file and what to do."""


class SlideSource:
    """Base class: subclasses set ``shape`` (H, W, C), ``name``, ``level``, ``mpp`` and implement ``_read``."""

    shape: tuple[int, int, int]
    name: str = "array"
    path: str | None = None
    level: int = 0
    mpp: float | None = None
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
            raise self._read_error(f"level {self.level} region y={y0}:{y1} x={x0}:{x1}", error) from error

    def _read_error(self, what: str, error: Exception) -> SlideError:
        _openslide_handle.cache_clear()  # an OpenSlide handle is unusable after an error: reopen next time
        return SlideError(
            f"{self.path or self.name}: reading {what} failed ({type(error).__name__}: {error}); "
            "the file may be corrupt: re-export or re-scan it"
        )

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        """Slicing for Dask's ``from_array``: basic slices only."""
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        block = self.read(y0, y1, x0, x1)
        return block[(slice(None), slice(None)) + tuple(key[2:])] if len(key) > 2 else block

    def read_window(self, y: int, x: int, size: int) -> np.ndarray:
        """A size x size window at (y, x), possibly outside the slide, mirrored as np.pad "symmetric"."""
        return read_window(self, y, x, size)

    def to_dask(self, chunk: int = 2048) -> da.Array:
        """The whole level as a lazy Dask array, (H, W, C) in ``chunk``-sized blocks."""
        import dask.array as da

        return da.from_array(self, chunks=(chunk, chunk, self.shape[2]), asarray=False, lock=False, fancy=False)

    @property
    def size(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """A low-resolution RGB view of the whole level (longer side <= max_side), by striding."""
        step = max(1, -(-max(self.size) // max_side))
        return np.asarray(self.to_dask(chunk=max(step * 256, 2048))[::step, ::step].compute())


def read_window(array: Any, y: int, x: int, size: int) -> np.ndarray:
    """Mirrored window from any (H, W[, C]) array-like supporting 2-D slicing (source, numpy, zarr, dask).

    Only the source span the window needs is read once; interior windows are plain slices.
    """
    height, width = array.shape[0], array.shape[1]
    ylo, yhi, yidx = window_source(y, size, height)
    xlo, xhi, xidx = window_source(x, size, width)
    block = array[ylo:yhi, xlo:xhi]
    if hasattr(block, "compute"):
        block = block.compute()
    block = np.asarray(block)
    if yhi - ylo == size and (yidx == np.arange(size)).all() and xhi - xlo == size and (xidx == np.arange(size)).all():
        return block
    return block[yidx][:, xidx]


def input_windows(slide: da.Array, grid: TileGrid, tiles: list[Tile] | None = None) -> da.Array:
    """Lazy (N, I, I, C) Dask array of the tiles' mirrored input windows cut from a Dask slide."""
    import dask.array as da

    windows = []
    for tile in tiles if tiles is not None else list(grid):
        y, x = grid.input_origin(tile)
        ylo, yhi, yidx = window_source(y, grid.input_size, slide.shape[0])
        xlo, xhi, xidx = window_source(x, grid.input_size, slide.shape[1])
        windows.append(slide[ylo:yhi, xlo:xhi][yidx][:, xidx])
    return da.stack(windows)


# --------------------------------------------------------------------------- sources
class ArraySource(SlideSource):
    """An in-memory numpy array, a zarr array or a Dask array of shape (H, W) or (H, W, C)."""

    def __init__(self, array: Any, name: str = "array", mpp: float | None = None):
        if array.ndim not in (2, 3):
            raise SlideError(f"{name}: expected an (H, W) or (H, W, C) image, got shape {array.shape}")
        if np.dtype(array.dtype) != np.uint8:
            raise SlideError(f"{name}: expected uint8 pixels, got {array.dtype}; convert with (x * 255).astype(np.uint8)")
        self.array = array
        self.name = name
        self.mpp = mpp
        channels = array.shape[2] if array.ndim == 3 else 1
        self.shape = (int(array.shape[0]), int(array.shape[1]), int(channels))

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = self.array[y0:y1, x0:x1]
        if hasattr(block, "compute"):
            block = block.compute()
        block = np.asarray(block)
        return block[..., None] if block.ndim == 2 else block


@functools.lru_cache(maxsize=16)
def _openslide_handle(path: str):
    import openslide

    return openslide.OpenSlide(path)


class OpenSlideSource(SlideSource):
    """Any format OpenSlide reads (SVS, NDPI, MRXS, generic tiled TIFF, ...), RGBA composited on white."""

    def __init__(self, path: str, level: int = 0):
        self.path = str(path)
        self.name = Path(path).name
        handle = self._handle()
        if not 0 <= level < handle.level_count:
            raise SlideError(f"{path}: level {level} does not exist; this slide has levels 0..{handle.level_count - 1}")
        self.level = level
        self.downsample = float(handle.level_downsamples[level])
        width, height = handle.level_dimensions[level]
        self.shape = (height, width, 3)
        mpp_x = handle.properties.get("openslide.mpp-x")
        self.mpp = float(mpp_x) * self.downsample if mpp_x else None
        self.level_count = handle.level_count

    def _handle(self):
        return _openslide_handle(self.path)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """From the slide's own pyramid (OpenSlide picks the best level), not by reading level 0."""
        height, width = self.size
        scale = max_side / max(height, width)
        if scale >= 1:
            return self.read(0, height, 0, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        try:
            return composite_on_white(np.asarray(self._handle().get_thumbnail(size).convert("RGBA")))
        except Exception as error:
            raise self._read_error("a thumbnail", error) from error

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        origin = (int(round(x0 * self.downsample)), int(round(y0 * self.downsample)))
        rgba = np.asarray(self._handle().read_region(origin, self.level, (x1 - x0, y1 - y0)))
        return composite_on_white(rgba)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA -> RGB over a white background (OpenSlide returns transparent pixels outside scanned areas)."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    if (alpha == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    rgb = (rgba[..., :3].astype(np.uint16) * alpha + 255 * (255 - alpha) + 127) // 255
    return rgb.astype(np.uint8)


@functools.lru_cache(maxsize=16)
def _zarr_level(path: str, level: int):
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        if level:
            raise SlideError(f"{path}: a single Zarr array has only level 0, not {level}")
        return node
    if str(level) not in node:
        raise SlideError(f"{path}: Zarr group has no array '{level}' (pyramid level); levels are {sorted(node.array_keys())}")
    return node[str(level)]


class ZarrSource(SlideSource):
    """A Zarr array (H, W[, C]) or a level of a multiscale Zarr group (paths "0", "1", ...)."""

    def __init__(self, path: str, level: int = 0, mpp: float | None = None):
        self.path, self.level, self.name, self.mpp = str(path), level, Path(path).name, mpp
        array = _zarr_level(self.path, level)
        self.shape = ArraySource(array, self.path).shape

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return ArraySource(_zarr_level(self.path, self.level), self.path)._read(y0, y1, x0, x1)


@functools.lru_cache(maxsize=16)
def _tiff_level(path: str, level: int):
    import tifffile
    import zarr

    with tifffile.TiffFile(path) as tif:
        levels = len(tif.series[0].levels)
        page = tif.series[0].levels[level].pages[0] if level < levels else None
        mpp = _tiff_mpp(page) if page is not None else None
    if level >= levels:
        raise SlideError(f"{path}: level {level} does not exist; this TIFF has levels 0..{levels - 1}")
    return zarr.open_array(tifffile.imread(path, aszarr=True, level=level), mode="r"), mpp


def _tiff_mpp(page) -> float | None:
    tags = page.tags
    if "XResolution" not in tags or "ResolutionUnit" not in tags:
        return None
    numerator, denominator = tags["XResolution"].value
    unit = int(tags["ResolutionUnit"].value)
    per_unit = numerator / denominator if denominator else 0
    microns = {2: 25400.0, 3: 10000.0}.get(unit)
    return microns / per_unit if microns and per_unit > 0 else None


class TiffSource(SlideSource):
    """A (pyramidal) TIFF read with tifffile, for TIFFs OpenSlide does not open (e.g. stripped ones)."""

    def __init__(self, path: str, level: int = 0):
        self.path, self.level, self.name = str(path), level, Path(path).name
        array, self.mpp = _tiff_level(self.path, level)
        self.shape = ArraySource(array, self.path).shape

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return ArraySource(_tiff_level(self.path, self.level)[0], self.path)._read(y0, y1, x0, x1)


def open_slide(source: Any, level: int = 0, mpp: float | None = None) -> SlideSource:
    """Open ``source`` (a path, or a numpy / zarr / Dask array) at pyramid ``level``.

    Paths: OpenSlide for the formats it knows, Zarr for directories or ``*.zarr``, tifffile for other TIFFs.
    ``mpp`` overrides the µm/px read from the file's metadata.
    """
    if isinstance(source, SlideSource):
        return source
    if not isinstance(source, (str, os.PathLike)):
        if level:
            raise SlideError("an in-memory array has only level 0")
        return ArraySource(source, mpp=mpp)
    path = Path(source)
    if not path.exists():
        raise SlideError(f"{path}: no such slide file or directory; check the path")
    if path.is_dir() or path.suffix == ".zarr":
        opened: SlideSource = ZarrSource(str(path), level, mpp)
    else:
        opened = _open_file(path, level)
    if mpp is not None:
        opened.mpp = mpp
    return opened


def _open_file(path: Path, level: int) -> SlideSource:
    import openslide

    if path.stat().st_size == 0:
        raise SlideError(f"{path}: the file is empty (0 bytes); the copy or download was interrupted: copy it again")

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detect_format raises on unreadable files in some versions
        vendor = None
    if vendor is not None:
        try:
            return OpenSlideSource(str(path), level)
        except openslide.OpenSlideError as error:
            _openslide_handle.cache_clear()
            raise SlideError(f"{path}: OpenSlide cannot open it ({error}); check the file is complete, or convert it to a tiled pyramidal TIFF") from None
    head = path.read_bytes()[:4] if path.is_file() else b""
    if head in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # a (Big)TIFF, including SVS-like files
        try:
            return TiffSource(str(path), level)
        except SlideError:
            raise
        except Exception as error:
            raise SlideError(
                f"{path}: a TIFF that neither OpenSlide nor tifffile can read ({type(error).__name__}: {error}); "
                "it may be truncated or corrupt: copy or re-export it, or convert it to a tiled pyramidal TIFF"
            ) from None
    raise SlideError(
        f"{path}: not a slide ({path.stat().st_size} bytes starting {head!r}): OpenSlide does not recognise it and it "
        "is not a TIFF or Zarr; check the file, or convert it to a tiled pyramidal TIFF or OME-Zarr"
    )
