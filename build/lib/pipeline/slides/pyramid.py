"""A slide's pyramid, opened once: levels, sizes, downsamples, µm/px, vendor, associated images, exact reads.

Everything that needs a fact about a slide (level choice by µm/px, ``level0_downsample``, tissue detection,
previews, the readers) takes it from one :class:`SlidePyramid`, made by :func:`open_pyramid`. Its levels
are read as :class:`LevelSource` views that return exactly the pixels of the level's own raster, the same
as one read of the whole level from its origin:

* **TIFF family** (Aperio SVS, generic tiled TIFF, OME-TIFF, Philips, Hamamatsu NDPI, any tiled or stripped
  8-bit TIFF): the level's own tiles, decoded with tifffile (:mod:`pipeline.slides.tiff_reader`). For the files
  OpenSlide knows, OpenSlide supplies the metadata (vendor, µm/px, downsamples, associated images) and, at
  open, the top-left tile of every level is compared between the two readers.
* **Other OpenSlide formats** (MIRAX, Hamamatsu VMS, DICOM, Leica SCN, Ventana BIF, ...): OpenSlide, at
  levels whose downsample is a whole number (a level-0 origin then lands on a whole pixel of the level, so
  nothing is resampled). OpenSlide cannot read the other levels without resampling each region by its own
  sub-pixel shift; they are resampled once from the nearest exact level (:class:`ResampledSource`), which is
  exact against the whole resampled image but not the scanner's own pixels, with a warning.
* **Zarr** arrays and multiscale groups, and in-memory arrays: their own pixels.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.slides.sources import ArraySource, ResampledSource, SlideError, SlideSource, composite_on_white, downscale, fit_within
from pipeline.slides.tiff_reader import level_reader, open_tiff

logger = logging.getLogger(__name__)

# OpenSlide vendors whose pyramid is plain TIFF pages that tifffile reads tile for tile (checked at open).
# Not here: Leica SCN (regions placed in a collection), Ventana BIF and Trestle (overlapping tiles).
TIFF_VENDORS = ("aperio", "generic-tiff", "hamamatsu", "philips")


@dataclass(frozen=True)
class PyramidLevel:
    """One level: (height, width), level-0 pixels per pixel (OpenSlide's mean of the two axes), and whether
    its own raster can be read (False: only resampled from a finer level, see the module docstring)."""

    shape: tuple[int, int]
    downsample: float
    native: bool = True


@dataclass(frozen=True)
class SlidePyramid:
    """One slide's facts, read once when it is opened; picklable (readers reopen files once per process).

    ``reader`` reads a level's region: ``reader.read(level, y0, y1, x0, x1)`` and ``reader.associated_image(name)``;
    for a one-level pyramid of a view (an array) it is the view itself. ``pixels`` says how (provenance)."""

    name: str
    path: str | None
    vendor: str
    levels: tuple[PyramidLevel, ...]
    channels: int
    mpp: float | None  # µm/px of level 0; None: unknown
    reader: Any
    pixels: str
    associated: tuple[str, ...] = ()

    @classmethod
    def of_view(cls, view: SlideSource) -> SlidePyramid:
        """A one-level pyramid around an existing view (an in-memory array, a resampled view, ...); the view
        keeps its own ``level0_downsample``, the pyramid's level 0 is the view itself."""
        return cls(view.name, view.path, "array", (PyramidLevel(view.size, 1.0),),
                   view.shape[2], view.mpp, view, "as given")  # fmt: skip

    @property
    def level_count(self) -> int:
        return len(self.levels)

    def level_mpp(self, index: int) -> float | None:
        return self.mpp * self.levels[index].downsample if self.mpp else None

    def with_mpp(self, mpp: float) -> SlidePyramid:
        """The same pyramid with level 0 at ``mpp`` µm/px (for files whose metadata lacks or misstates it)."""
        reader = self.reader
        if isinstance(reader, SlideSource):
            reader = copy.copy(reader)
            reader.mpp = mpp
        return dataclasses.replace(self, mpp=float(mpp), reader=reader)

    def level(self, index: int) -> SlideSource:
        """The view of level ``index``: its own pixels, or resampled from the nearest exact finer level."""
        if not 0 <= index < len(self.levels):
            raise SlideError(f"{self.path or self.name}: level {index} does not exist; this slide has levels 0..{len(self.levels) - 1}")
        if isinstance(self.reader, SlideSource):
            return self.reader
        if self.levels[index].native:
            return LevelSource(self, index)
        base = max(i for i in range(index) if self.levels[i].native)
        factor = self.levels[index].downsample / self.levels[base].downsample
        logger.warning(
            "%s: level %d (downsample %.4g) cannot be read without resampling through OpenSlide; it is resampled "
            "from level %d instead (exact tiling, but not the scanner's own pixels of that level)",
            self.name, index, self.levels[index].downsample, base,
        )  # fmt: skip
        return ResampledSource(LevelSource(self, base), factor, shape=self.levels[index].shape, level=index)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The whole slide with its longer side at most ``max_side``, from the coarsest exact level that is at
        least that large (as OpenSlide's ``get_thumbnail`` picks its level), Lanczos-filtered."""
        size = fit_within(self.levels[0].shape, max_side)
        big_enough = [i for i, lv in enumerate(self.levels) if lv.native and lv.shape[0] >= size[0] and lv.shape[1] >= size[1]]
        return downscale(self.level(max(big_enough, key=lambda i: self.levels[i].downsample)), size)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image ("label", "macro", "thumbnail", ...: see ``associated``) as RGB uint8."""
        if name not in self.associated:
            raise KeyError(f"{self.path or self.name}: no associated image {name!r}; it has {list(self.associated)}")
        return self.reader.associated_image(name)


class LevelSource(SlideSource):
    """One level of a pyramid, read natively: exactly the pixels of that level's own raster."""

    def __init__(self, pyramid: SlidePyramid, level: int):
        self.pyramid, self.level = pyramid, level
        self.path, self.name = pyramid.path, pyramid.name
        self.shape = (*pyramid.levels[level].shape, pyramid.channels)
        self.mpp = pyramid.level_mpp(level)
        self.level0_downsample = pyramid.levels[level].downsample
        self.pixels = f"{pyramid.vendor} level {level}, {pyramid.pixels}"

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self.pyramid.reader.read(self.level, y0, y1, x0, x1)

    def thumbnail(self, max_side: int = 1024) -> np.ndarray:
        """The slide's thumbnail from its pyramid (every level covers the same area)."""
        return self.pyramid.thumbnail(max_side)


# --------------------------------------------------------------------------- readers (picklable)
class OpenSlideHandles:
    """Open OpenSlide handles per process, at most ``size`` (least recently used closed first).

    OpenSlide latches an error on its handle, so a failed read must reopen that file; :meth:`drop` forgets
    one file's handle and keeps every other slide's. Handles are forgotten, never closed: another thread of
    the same reader may still be reading through one (openslide-python closes it once nobody holds it)."""

    def __init__(self, size: int = 16) -> None:
        self.size, self.handles = size, OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, path: str):
        import openslide

        with self.lock:
            if path in self.handles:
                self.handles.move_to_end(path)
                return self.handles[path]
        handle = openslide.OpenSlide(path)
        with self.lock:
            self.handles[path] = handle
            while len(self.handles) > self.size:
                self.handles.popitem(last=False)
        return handle

    def drop(self, path: str) -> None:
        with self.lock:
            self.handles.pop(path, None)


openslide_handle = OpenSlideHandles()


@dataclass(frozen=True)
class OpenSlideReader:
    """OpenSlide at levels with whole-number downsamples: origin ``x * d`` is then a whole level-0 pixel."""

    path: str
    downsamples: tuple[float, ...]

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        step = int(self.downsamples[level])
        try:
            rgba = openslide_handle(self.path).read_region((x0 * step, y0 * step), level, (x1 - x0, y1 - y0))
        except Exception:
            openslide_handle.drop(self.path)  # an OpenSlide handle is unusable after an error: reopen next time
            raise
        return composite_on_white(np.asarray(rgba))

    def associated_image(self, name: str) -> np.ndarray:
        return composite_on_white(np.asarray(openslide_handle(self.path).associated_images[name].convert("RGBA")))


@dataclass(frozen=True)
class TiffReader:
    """tifffile, tile for tile, on the pyramid of series ``series``; associated images are other series."""

    path: str
    series: int
    associated_series: tuple[tuple[str, int], ...] = ()

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return level_reader(self.path, self.series, level).read(y0, y1, x0, x1)

    def associated_image(self, name: str) -> np.ndarray:
        image = open_tiff(self.path).series[dict(self.associated_series)[name]].asarray()
        image = image[..., None] if image.ndim == 2 else image
        return composite_on_white(image) if image.shape[2] == 4 else image


@functools.lru_cache(maxsize=16)
def _zarr_array(path: str, key: str):
    import zarr

    return zarr.open_array(f"{path}/{key}" if key else path, mode="r")


@dataclass(frozen=True)
class ZarrReader:
    """A Zarr array (H, W[, C]) per level, by its path in the group ("" for a lone array)."""

    path: str
    keys: tuple[str, ...]

    def read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        block = np.asarray(_zarr_array(self.path, self.keys[level])[y0:y1, x0:x1])
        return block[..., None] if block.ndim == 2 else block

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(name)


# --------------------------------------------------------------------------- opening
def open_pyramid(source: Any, mpp: float | None = None) -> SlidePyramid:
    """The pyramid of ``source``: a slide file, a Zarr array or multiscale group, an in-memory (H, W[, C])
    uint8 array, a view, or a pyramid. ``mpp`` overrides the µm/px of level 0 read from the metadata."""
    if isinstance(source, SlidePyramid):
        pyramid = source
    elif isinstance(source, SlideSource):
        pyramid = SlidePyramid.of_view(source)
    elif not isinstance(source, (str, os.PathLike)):
        pyramid = SlidePyramid.of_view(ArraySource(source))
    else:
        from pipeline.slides import formats as slide_formats

        path = Path(source)
        if not path.exists():
            raise SlideError(f"{path}: no such slide file or directory; check the path")
        pyramid = slide_formats.open_zarr(path) if slide_formats.is_zarr(path) else slide_formats.open_file(path)
    return pyramid.with_mpp(mpp) if mpp is not None else pyramid


def open_slide(source: Any, level: int = 0, mpp: float | None = None) -> SlideSource:
    """The view of ``source`` at pyramid ``level`` (see :func:`open_pyramid`); a view is returned as it is."""
    if isinstance(source, SlideSource) and mpp is None:
        if level and level != source.level:
            raise SlideError(f"{source.path or source.name}: a view holds one level ({source.level}), not {level}")
        return source
    return open_pyramid(source, mpp).level(level)
