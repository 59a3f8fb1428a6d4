"""Native reads of one TIFF pyramid level: decode the level's own tiles (or strips), never resample.

OpenSlide addresses every level in level-0 pixels. At a level whose downsample is not a whole number
(Aperio's 4.0002x, a generic TIFF's 2.0005x), a region's origin falls between two pixels of the level and
OpenSlide renders it with a sub-pixel shift, a different one for every region: tiles read that way leave
seams. Decoding the level's own tiles gives exactly the pixels of its raster at any origin. It is also
faster: no painting, one process-wide cache of decoded tiles (LRU by bytes), and optionally the tiles a
region needs are decoded in threads (imagecodecs releases the GIL).

What it reads: one page per level (tiled or stripped), 8-bit, interleaved or planar samples, any
compression tifffile decodes (JPEG, JPEG 2000, deflate, LZW, ...). Missing tiles (offset 0) are white,
as OpenSlide shows them (transparent, composited on white).
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from pipeline.slides.sources import composite_on_white

TILE_CACHE_BYTES = int(os.environ.get("WSI_TILE_CACHE_MB", "64")) << 20  # per process, all slides together
# Threads that decode the tiles of one read. 1 by default: reads already run one per CPU (Ray tasks, the
# CPU actor's reader), and on this project's 2-core machine 2 threads were no faster per window, 1-11 %
# slower (benchmarks/reads.py, README "Performance" (f)); worth trying for in-process runs on idle cores.
DECODE_THREADS = max(1, int(os.environ.get("WSI_DECODE_THREADS", "1")))
# A strip or tile is decoded whole for every window that touches it: one bigger than this (a whole 20,000^2 image in
# one zlib strip is 1.2 GB) would cost that much memory and time per tile. Slides with larger ones are refused.
MAX_SEGMENT_BYTES = int(os.environ.get("WSI_MAX_SEGMENT_MB", "256")) << 20
MISSING_TILE_VALUE = 255  # white: glass, as OpenSlide composites a missing (transparent) tile


class DecodedTiles:
    """Process-wide LRU of decoded tiles, bounded by bytes; keys are (path, series, level, tile index)."""

    def __init__(self, budget: int = TILE_CACHE_BYTES):
        self.budget, self.used = budget, 0
        self.tiles: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple) -> np.ndarray | None:
        with self.lock:
            tile = self.tiles.get(key)
            if tile is not None:
                self.tiles.move_to_end(key)
            return tile

    def put(self, key: tuple, tile: np.ndarray) -> None:
        with self.lock:
            if key in self.tiles or tile.nbytes > self.budget:
                return
            self.tiles[key] = tile
            self.used += tile.nbytes
            while self.used > self.budget:
                _, old = self.tiles.popitem(last=False)
                self.used -= old.nbytes


CACHE = DecodedTiles()


@functools.lru_cache(maxsize=1)
def _decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="tiff-decode")


@functools.lru_cache(maxsize=16)
def open_tiff(path: str):
    """One parsed TiffFile per file and process (kept open: its pages are read lazily)."""
    import tifffile

    return tifffile.TiffFile(path)


class TiffLevelReader:
    """Pixels of one level (a single TIFF page) of series ``series``, read from its own tiles or strips."""

    def __init__(self, path: str, series: int, level: int):
        self.key = (path, series, level)
        tif = open_tiff(path)
        pages = tif.series[series].levels[level].pages
        if len(pages) != 1:
            raise ValueError(f"level {level} spans {len(pages)} pages (one per channel or plane); expected one")
        page = pages[0].keyframe if pages[0] is not None else tif.series[series].levels[level].keyframe
        planes, depth, height, width, contig = page.shaped
        if depth != 1 or page.dtype != np.uint8:
            raise ValueError(f"level {level}: {page.dtype} pixels in {depth} planes; expected 8-bit 2-D")
        self.height, self.width, self.planes = height, width, planes
        self.samples = planes * contig
        self.alpha = self.samples == 4  # RGBA: composited on white, as OpenSlide does
        self.chunk_h, self.chunk_w = (page.tilelength, page.tilewidth) if page.is_tiled else (page.rowsperstrip, width)
        self.chunk_h = min(self.chunk_h, height)
        self.rows, self.cols = -(-height // self.chunk_h), -(-width // self.chunk_w)
        self.offsets, self.counts = page.dataoffsets, page.databytecounts
        if len(self.offsets) != planes * self.rows * self.cols:
            raise ValueError(f"level {level}: {len(self.offsets)} tiles where the layout needs {planes * self.rows * self.cols}")
        self.decode = page.decode  # tifffile's decoder for this page's compression, predictor and colour space
        self.decode_args: dict[str, Any] = {"_fullsize": True}
        if page.jpegtables is not None:
            self.decode_args["jpegtables"] = page.jpegtables
        if page.jpegheader is not None:
            self.decode_args["jpegheader"] = page.jpegheader
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.height, self.width, 3 if self.alpha else self.samples

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the level) as an (h, w, samples) uint8 array."""
        rows = range(y0 // self.chunk_h, (y1 - 1) // self.chunk_h + 1)
        cols = range(x0 // self.chunk_w, (x1 - 1) // self.chunk_w + 1)
        cells = [(r, c) for r in rows for c in cols]
        tiles = self._tiles([r * self.cols + c for r, c in cells])
        out = np.empty((y1 - y0, x1 - x0, self.samples), dtype=np.uint8)
        for (r, c), tile in zip(cells, tiles):
            ty, tx = r * self.chunk_h, c * self.chunk_w
            a0, a1, b0, b1 = max(y0, ty), min(y1, ty + self.chunk_h), max(x0, tx), min(x1, tx + self.chunk_w)
            out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = tile[a0 - ty : a1 - ty, b0 - tx : b1 - tx]
        return composite_on_white(out) if self.alpha else out

    def _tiles(self, indices: list[int]) -> list[np.ndarray]:
        found = [CACHE.get((*self.key, i)) for i in indices]
        missing = [i for i, tile in zip(indices, found) if tile is None]
        if len(missing) > 1 and DECODE_THREADS > 1:
            decoded = dict(zip(missing, _decode_pool().map(self._decode_tile, missing)))
        else:
            decoded = {i: self._decode_tile(i) for i in missing}
        return [tile if tile is not None else decoded[i] for i, tile in zip(indices, found)]

    def _decode_tile(self, index: int) -> np.ndarray:
        """Tile ``index`` (all its samples), full size, (chunk_h, chunk_w, samples)."""
        planes = [self._decode_segment(p * self.rows * self.cols + index) for p in range(self.planes)]
        tile = planes[0] if self.planes == 1 else np.concatenate(planes, axis=-1)
        CACHE.put((*self.key, index), tile)
        return tile

    def _decode_segment(self, index: int) -> np.ndarray:
        offset, count = self.offsets[index], self.counts[index]
        shape = (self.chunk_h, self.chunk_w, self.samples // self.planes)
        if not offset or not count:
            return np.full(shape, MISSING_TILE_VALUE, dtype=np.uint8)
        data = os.pread(self.fd, count, offset)
        segment = self.decode(data, index, **self.decode_args)[0]
        return segment.reshape(-1, *shape[1:])[: shape[0]]


@functools.lru_cache(maxsize=64)
def level_reader(path: str, series: int, level: int) -> TiffLevelReader:
    """One reader per (file, series, level) and process; readers are cheap, decoded tiles live in CACHE."""
    return TiffLevelReader(path, series, level)

