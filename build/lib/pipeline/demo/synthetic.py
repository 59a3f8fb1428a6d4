"""Synthetic H&E-like whole-slide images with a ground-truth nuclei mask.

Why: demos, tests and benchmarks need a slide with known answers that anyone can create offline at any
size (up to multi-gigapixel). Every pixel is a pure function of (seed, position): hashed lattice noise for
tissue and texture, nuclei and lumens hashed per coarse cell. So blocks of tiles render independently with
a small halo, memory stays at a few blocks, nuclei crossing tile borders are drawn identically on both
sides, and the same arguments always give the same bytes.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from pipeline.store.durability import atomic_file

log = logging.getLogger(__name__)

_M32 = 0xFFFFFFFF
_HALO = 8  # context px around each block: covers both Gaussian blurs (radius 3 each)
_BLOCK_TILES = 8  # tiles rendered together along a tile row; bounds memory
_TOP_LEVEL_MAX = 1024  # halve until the longer side is at most this
_SLOTS = 4  # candidate nuclei per coarse cell
_BUFFER = 32 << 20  # tifffile encode buffer; its 512 MiB default would defeat streaming
# Optical density (log10) per unit stain: eosin 0.5 ~ pink (230, 150, 190), haematoxylin 1.0 ~ purple
# (60, 40, 120); background ~ (242, 242, 242). Mixing in OD space gives natural H&E colours.
_OD_H = np.array([0.63, 0.80, 0.33], np.float32)
_OD_E = np.array([0.09, 0.46, 0.256], np.float32)
_OD_BG = 0.0227


@dataclass(frozen=True)
class DemoSlide:
    """Where a generated slide and its mask live, and what they contain."""

    slide_path: Path
    mask_path: Path
    shape: tuple[int, int]  # level-0 (height, width)
    mpp: float
    nuclei_count: int
    level_shapes: tuple[tuple[int, int], ...] = ()


def _mix(h: np.ndarray) -> np.ndarray:
    """lowbias32 integer hash of a uint32 array (multiplications wrap by design)."""
    h = (h ^ (h >> 16)) * np.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * np.uint32(0x846CA68B)
    return h ^ (h >> 16)


def _salt(seed: int, *keys: int) -> int:
    """Independent stream id per (seed, purpose); 1-element arrays avoid scalar overflow warnings."""
    h = _mix(np.array([seed & _M32], np.uint32))
    for k in keys:
        h = _mix(h + np.uint32(0x9E3779B9) + np.uint32(k & _M32))
    return int(h[0])


def _uniform(i, j, salt: int) -> np.ndarray:
    """Uniform [0, 1) float32 hashed from integer coordinates (broadcast) and a salt."""
    iu, ju = (np.atleast_1d(np.asarray(v, np.int64)).astype(np.uint32) for v in (i, j))
    h = _mix(ju + _mix(iu + np.uint32(salt)))
    return (h >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def _smooth(f):
    return f * f * (3.0 - 2.0 * f)


def _weights(coords, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """Interpolation matrix (len(coords), nodes) from lattice nodes to coords, and the node ids."""
    t = np.asarray(coords, np.float64) / cell
    i0 = np.floor(t).astype(np.int64)
    nodes, rows = np.arange(i0.min(), i0.max() + 2), np.arange(t.size)
    w = np.zeros((t.size, nodes.size), np.float32)
    f = _smooth(t - i0)
    w[rows, i0 - nodes[0]], w[rows, i0 - nodes[0] + 1] = 1.0 - f, f
    return w, nodes


def _noise_grid(ys, xs, cell_y: float, cell_x: float, salt: int) -> np.ndarray:
    """Value noise on the grid ys x xs; separable, so two small matrix products."""
    (wy, ny), (wx, nx) = _weights(ys, cell_y), _weights(xs, cell_x)
    return (wy @ _uniform(ny[:, None], nx[None, :], salt)) @ wx.T


def _noise_pts(y, x, cell_y: float, cell_x: float, salt: int) -> np.ndarray:
    """The same value noise as _noise_grid, at scattered points."""
    ty, tx = np.asarray(y, np.float64) / cell_y, np.asarray(x, np.float64) / cell_x
    iy, ix = np.floor(ty).astype(np.int64), np.floor(tx).astype(np.int64)
    fy, fx = _smooth(ty - iy), _smooth(tx - ix)
    top = (1 - fx) * _uniform(iy, ix, salt) + fx * _uniform(iy, ix + 1, salt)
    bot = (1 - fx) * _uniform(iy + 1, ix, salt) + fx * _uniform(iy + 1, ix + 1, salt)
    return (1 - fy) * top + fy * bot


class _Model:
    """The slide as a function of position: tissue sections, lumens, stroma and nuclei."""

    def __init__(self, height: int, width: int, mpp: float, seed: int, tissue: float = 0.5) -> None:
        self.height, self.width, self.seed = height, width, seed
        self.s = s = 0.5 / mpp  # pixels per 0.5 um: nuclei and textures keep their physical size
        big = max(height, width)
        self.octaves = [(big / 6, 0.3), (big / 12, 0.15), (150 * s, 0.05), (40 * s, 0.03)]  # ragged outlines
        self.cell, self.rmax = max(8, round(40 * s)), math.ceil(8.5 * s * 1.2) + 1  # nuclei cell, max radius
        rng = np.random.default_rng([seed, 11])
        k, wide = int(rng.integers(2, 4)), width >= height
        long_, short = (width, height) if wide else (height, width)
        self.blobs = []  # 2-3 elliptical sections side by side along the long axis: (cy, cx, ry, rx, angle)
        for i in range(k):
            along, across = long_ * (i + 0.5 + rng.uniform(-0.08, 0.08)) / k, short * rng.uniform(0.44, 0.56)
            r_along, r_across = long_ * 0.42 / k * rng.uniform(0.9, 1.1), short * 0.4 * rng.uniform(0.85, 1.05)
            cy, cx, ry, rx = (across, along, r_across, r_along) if wide else (along, across, r_along, r_across)
            self.blobs.append((cy, cx, ry, rx, rng.uniform(-0.3, 0.3)))
        sy, sx = np.linspace(0, height - 1, min(height, 384)), np.linspace(0, width - 1, min(width, 384))
        field = self._field(sy, sx, grid=True)  # tissue covers about `tissue` of the slide (minus lumens)
        self.threshold = float(np.median(field) if tissue == 0.5 else np.quantile(field, 1.0 - tissue))

    def _field(self, y, x, grid: bool) -> np.ndarray:
        """Tissue where this exceeds self.threshold: max of the section cones plus noise."""
        noise = _noise_grid if grid else _noise_pts
        yy, xx = (np.asarray(y, np.float64)[:, None], np.asarray(x, np.float64)[None, :]) if grid else (y, x)
        cone = -np.inf
        for cy, cx, ry, rx, ang in self.blobs:
            u = ((yy - cy) * math.cos(ang) + (xx - cx) * math.sin(ang)) / ry
            v = ((xx - cx) * math.cos(ang) - (yy - cy) * math.sin(ang)) / rx
            cone = np.maximum(cone, 1 - np.sqrt(u * u + v * v))
        octaves = enumerate(self.octaves)
        return cone + sum(a * (noise(y, x, c, c, _salt(self.seed, 1, k)) - 0.5) for k, (c, a) in octaves)

    def _lumens(self, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
        """Empty round spaces (vessels, fat) near the box, hashed per cell: rows (cy, cx, ry, rx, angle)."""
        c, r = 160 * self.s, 41 * self.s
        cy = np.arange((y0 - r) // c, (y1 + r) // c + 1)[:, None]
        cx = np.arange((x0 - r) // c, (x1 + r) // c + 1)[None, :]
        u = [_uniform(cy, cx, _salt(self.seed, 2, j)).ravel() for j in range(6)]
        cy, cx = (v.ravel() for v in np.broadcast_arrays(cy, cx))
        ry = self.s * (10 + 30 * u[3])
        return np.stack([(cy + u[1]) * c, (cx + u[2]) * c, ry, ry * (0.45 + 0.55 * u[4]), np.pi * u[5]], 1)[u[0] < 0.3]

    @staticmethod
    def _lumen_rad(lum: np.ndarray, y, x) -> np.ndarray:
        """Normalised elliptical radius of (y, x) for each lumen (lumens on the last axis)."""
        dy, dx, cos, sin = y - lum[:, 0], x - lum[:, 1], np.cos(lum[:, 4]), np.sin(lum[:, 4])
        return np.hypot((dy * cos + dx * sin) / lum[:, 2], (dx * cos - dy * sin) / lum[:, 3])

    def alpha(self, ys, xs) -> np.ndarray:
        """Tissue opacity in [0, 1] on the (sorted) grid ys x xs: soft edges, empty lumens."""
        ys, xs = np.asarray(ys), np.asarray(xs)
        a = np.clip((self._field(ys, xs, True) - self.threshold) / 0.03, 0, 1).astype(np.float32)
        for lum in self._lumens(ys[0], ys[-1], xs[0], xs[-1]):
            i0, i1 = np.searchsorted(ys, [lum[0] - lum[2], lum[0] + lum[2]])
            j0, j1 = np.searchsorted(xs, [lum[1] - lum[2], lum[1] + lum[2]])
            rad = self._lumen_rad(lum[None], ys[i0:i1, None, None], xs[None, j0:j1, None])[..., 0]
            a[i0:i1, j0:j1] *= np.clip((rad - 0.8) / 0.25, 0, 1)
        return a

    def nuclei(self, y0: int, x0: int, h: int, w: int, texture: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """Rasterise every nucleus touching the box: (haematoxylin, 0/1 mask, number of centres inside)."""
        cs, r, s = self.cell, self.rmax, self.s
        cy = np.arange((y0 - r) // cs, (y0 + h + r) // cs + 1)[None, :, None]
        cx = np.arange((x0 - r) // cs, (x0 + w + r) // cs + 1)[None, None, :]
        slot = np.arange(_SLOTS)[:, None, None]
        u = [_uniform(cy * _SLOTS + slot, cx, _salt(self.seed, 3, j)).ravel() for j in range(8)]
        yc = (np.broadcast_to(cy, (_SLOTS, cy.size, cx.size)).ravel() + u[1]) * cs
        xc = (np.broadcast_to(cx, (_SLOTS, cy.size, cx.size)).ravel() + u[2]) * cs
        density = 0.15 + 0.6 * _noise_pts(yc, xc, 500 * s, 500 * s, _salt(self.seed, 4))  # denser patches
        idx = np.flatnonzero((u[0] < density) & (abs(yc - y0 - h / 2) < h / 2 + r) & (abs(xc - x0 - w / 2) < w / 2 + r))
        inside = self._field(yc[idx], xc[idx], False) > self.threshold + 0.01
        lum = self._lumens(y0 - r, y0 + h + r, x0 - r, x0 + w + r)
        if len(lum):
            inside &= self._lumen_rad(lum, yc[idx, None], xc[idx, None]).min(axis=1) > 1.05
        idx = idx[inside]
        yc, xc, hmap, mask = yc[idx], xc[idx], np.zeros((h, w), np.float32), np.zeros((h, w), np.uint8)
        count = int(np.count_nonzero((yc >= y0) & (yc < y0 + h) & (xc >= x0) & (xc < x0 + w)))
        if idx.size == 0:
            return hmap, mask, count
        a = (s * (4.5 + 4.0 * u[3][idx]))[:, None, None]  # semi-axes 4.5-8.5 px at 0.5 um/px
        b = np.maximum(a * (0.55 + 0.4 * u[4][idx, None, None]), 3.5 * s)
        th, ph = np.pi * u[5][idx, None, None], 2 * np.pi * u[6][idx, None, None]
        off = np.arange(-r, r + 1)
        gy = np.floor(yc).astype(np.int64)[:, None, None] + off[None, :, None]
        gx = np.floor(xc).astype(np.int64)[:, None, None] + off[None, None, :]
        dy, dx = gy - yc[:, None, None], gx - xc[:, None, None]
        pu, pv = dy * np.cos(th) + dx * np.sin(th), dx * np.cos(th) - dy * np.sin(th)
        ang = np.arctan2(pv, pu)
        rad = np.hypot(pu / a, pv / b) / (1 + 0.08 * np.sin(2 * ang + ph) + 0.06 * np.sin(3 * ang - ph))
        ly, lx = gy - y0, gx - x0
        sel = (rad <= 1) & (ly >= 0) & (ly < h) & (lx >= 0) & (lx < w)
        ly, lx = np.broadcast_to(ly, sel.shape)[sel], np.broadcast_to(lx, sel.shape)[sel]
        mask[ly, lx] = 1
        if texture:  # darker rim, speckled chromatin; max() keeps overlaps independent of drawing order
            dark = (0.75 + 0.4 * u[7][idx, None, None]) * (0.85 + 0.35 * _smooth(np.clip((rad - 0.6) / 0.4, 0, 1)))
            chrom = 0.8 + 0.4 * _uniform(ly + y0, lx + x0, _salt(self.seed, 5))
            np.maximum.at(hmap, (ly, lx), (dark[sel] * chrom).astype(np.float32))
        return hmap, mask, count

    def rgb(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Render the (h, w, 3) uint8 block at (y0, x0); identical however the slide is cut into blocks."""
        hy, hx, ph, pw, s, seed = y0 - _HALO, x0 - _HALO, h + 2 * _HALO, w + 2 * _HALO, self.s, self.seed
        ys, xs = np.arange(hy, hy + ph), np.arange(hx, hx + pw)
        alpha = self.alpha(ys, xs)
        grain = ndimage.gaussian_filter(_uniform(ys[:, None], xs[None, :], _salt(seed, 6)), 0.8) - 0.5
        med = _noise_grid(ys, xs, 120 * s, 120 * s, _salt(seed, 7)) - 0.5
        mix = _smooth(_noise_grid(ys, xs, 300 * s, 300 * s, _salt(seed, 8)))
        fib = mix * _noise_grid(ys, xs, 5 * s, 40 * s, _salt(seed, 9)) - 0.5  # fibres in two directions
        fib += (1 - mix) * _noise_grid(ys, xs, 40 * s, 5 * s, _salt(seed, 10))
        eosin = alpha * np.maximum(0.42 + 0.35 * med + 0.35 * fib + 0.6 * grain, 0.1)
        nuc, mask, _ = self.nuclei(hy, hx, ph, pw, texture=True)
        haem = np.maximum(alpha * (0.06 + 0.05 * med), nuc)
        eosin = np.where(mask > 0, 0.6 * eosin, eosin)
        od = haem[..., None] * _OD_H + eosin[..., None] * _OD_E + (_OD_BG + 0.02 * grain)[..., None]
        od = ndimage.gaussian_filter(od.astype(np.float32), (0.7, 0.7, 0))  # mild optical blur
        out = 255.0 * np.power(np.float32(10.0), -od[_HALO:-_HALO, _HALO:-_HALO])
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def tissue_region(
    height: int, width: int, mpp: float = 0.5, seed: int = 0, downsample: int = 32, tissue: float = 0.5
) -> np.ndarray:
    """Ground truth tissue (bool) of make_demo_slide's slide, sampled at the centre of every `downsample` px."""
    model = _Model(height, width, mpp, seed, tissue)
    ys, xs = np.arange(downsample // 2, height, downsample), np.arange(downsample // 2, width, downsample)
    return model.alpha(ys, xs) > 0.5


def _blocks(h: int, w: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """Blocks (y0, x0, bh, bw) of up to _BLOCK_TILES tiles, in tile row-major order."""
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile * _BLOCK_TILES):
            yield y0, x0, min(tile, h - y0), min(tile * _BLOCK_TILES, w - x0)


def _split(block: np.ndarray, tile: int) -> Iterator[np.ndarray]:
    """Tiles of a one-tile-high block, left to right (edge tiles short; tifffile pads them)."""
    for x in range(0, block.shape[1], tile):
        yield block[:, x : x + tile]


def _tiles(render, model: _Model, tile: int) -> Iterator[np.ndarray]:
    """Tiles in row-major order; blocks render on a few threads (numpy releases the GIL) with bounded lookahead."""
    workers = max(1, min(4, (os.cpu_count() or 1) - 1))
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for block in _blocks(model.height, model.width, tile):
            pending.append(pool.submit(render, *block))
            if len(pending) > 2 * workers:
                yield from _split(pending.popleft().result(), tile)
        while pending:
            yield from _split(pending.popleft().result(), tile)


def _halve(img: np.ndarray) -> np.ndarray:
    """2x2 mean; an odd last row/column is replicated so the size is ceil(n / 2)."""
    if img.shape[0] % 2 or img.shape[1] % 2:
        img = np.pad(img, ((0, img.shape[0] % 2), (0, img.shape[1] % 2), (0, 0)), mode="edge")
    acc = img.reshape(img.shape[0] // 2, 2, img.shape[1] // 2, 2, -1).sum(axis=(1, 3), dtype=np.uint16)
    return ((acc + 2) // 4).astype(np.uint8)


def _downsampled_tiles(page: tifffile.TiffPage, tile: int) -> Iterator[np.ndarray]:
    """Tiles of `page` halved, decoding straight into one band of 2 * tile source rows (memory ~ width)."""
    (h, w), th, tw = page.shape[:2], page.tilelength, page.tilewidth
    per_row = -(-w // tw)
    band = np.empty((2 * tile, per_row * tw, 3), np.uint8)
    for i, (seg, _, _) in enumerate(page.segments(maxworkers=1, buffersize=8 << 20)):
        r, x = divmod(i, per_row)  # source tile row and column; th divides 2 * tile
        y = (r * th) % (2 * tile)
        band[y : y + th, x * tw : (x + 1) * tw] = seg.reshape(th, tw, -1)
        last = (r + 1) * th >= h
        if x == per_row - 1 and (y + th == 2 * tile or last):
            yield from _split(_halve(band[: y + min(th, h - r * th), :w]), tile)


def jpeg_options(mpp: float, tile: int = 256, jpeg_quality: int = 90) -> dict:
    """tifffile.write options of every image level of a demo slide (JPEG tiles, centimetre resolution unit)."""
    # OpenSlide reports openslide.mpp-x = 10000 / XResolution for centimetre units; scaled per level.
    return dict(tile=(tile, tile), metadata=None, resolutionunit="CENTIMETER", buffersize=_BUFFER,
                compression="jpeg", compressionargs={"level": jpeg_quality}, photometric="rgb")  # fmt: skip


def append_pyramid(path: Path, mpp: float, tile: int = 256, jpeg_quality: int = 90) -> list[tuple[int, int]]:
    """Append 2x-mean levels below the last level of the JPEG TIFF at ``path`` until the longer side is at most
    _TOP_LEVEL_MAX; each is computed from the level above read back from the file. Returns all level shapes."""
    jpeg = jpeg_options(mpp, tile, jpeg_quality)
    with tifffile.TiffFile(path) as tf:
        shapes = [tuple(page.shape[:2]) for page in tf.pages]
    while max(shapes[-1]) > _TOP_LEVEL_MAX:
        level, shape = len(shapes), (-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2))
        res = 1e4 / (mpp * 2**level)
        with tifffile.TiffFile(path) as tf, tifffile.TiffWriter(path, append=True) as tw:
            tw.write(_downsampled_tiles(tf.pages[level - 1], tile), shape=(*shape, 3), dtype=np.uint8,
                     resolution=(res, res), subfiletype=1, **jpeg)  # fmt: skip
        shapes.append(shape)
    return shapes


def make_demo_slide(
    path: str | os.PathLike,
    height: int = 4096,
    width: int = 4096,
    mpp: float = 0.5,
    seed: int = 0,
    tile: int = 256,
    jpeg_quality: int = 90,
    mask_path: str | os.PathLike | None = None,
    tissue: float = 0.5,
) -> DemoSlide:
    """Write a pyramidal JPEG TIFF (OpenSlide "generic-tiff") and its nuclei mask; return where and what.

    Level 0 and the uint8 0/1 mask (deflate, default `<stem>-mask.tiff`) are streamed tile by tile; each
    lower level is the 2x mean of the level above, read back from the file, so memory stays at a few tile
    rows at any size. Files are written under a `.partial` name and renamed when complete. ``tissue``: the
    fraction of the slide covered by tissue sections before lumens are cut out (0.5 gives ~48 % tissue).
    """
    if height < 1 or width < 1:
        raise ValueError(f"make_demo_slide: size {height}x{width} must be positive")
    if tile < 16 or tile % 16:
        raise ValueError(f"make_demo_slide: tile {tile} must be a positive multiple of 16 (JPEG tiles)")
    if not mpp > 0 or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"make_demo_slide: need mpp > 0 and 1 <= jpeg_quality <= 100, got {mpp}, {jpeg_quality}")
    if not 0 < tissue < 1:
        raise ValueError(f"make_demo_slide: tissue fraction {tissue} must be between 0 and 1")
    path = Path(path)
    mask_path = Path(mask_path) if mask_path else path.with_name(path.stem + "-mask.tiff")
    for p in (path, mask_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _Model(height, width, mpp, seed, tissue)
    common = dict(tile=(tile, tile), metadata=None, resolutionunit="CENTIMETER", buffersize=_BUFFER)  # the mask
    jpeg = jpeg_options(mpp, tile, jpeg_quality)
    counts: list[int] = []

    def mask_block(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        _, mask, count = model.nuclei(y0, x0, h, w, texture=False)
        counts.append(count)  # list.append is atomic; += on a shared int from threads would not be
        return mask

    with atomic_file(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(_tiles(model.rgb, model, tile), shape=(height, width, 3), dtype=np.uint8,
                     resolution=(1e4 / mpp, 1e4 / mpp), subfiletype=0, **jpeg)  # fmt: skip
        log.info("level 0 %dx%d written in %.1fs", width, height, time.perf_counter() - t0)
        shapes = append_pyramid(tmp, mpp, tile, jpeg_quality)
    with atomic_file(mask_path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        tw.write(_tiles(mask_block, model, tile), shape=(height, width), dtype=np.uint8, photometric="minisblack",
                 compression="zlib", resolution=(1e4 / mpp, 1e4 / mpp), **common)  # fmt: skip
    log.info("demo slide %s: %d levels, %d nuclei, %.1fs", path, len(shapes), sum(counts), time.perf_counter() - t0)
    return DemoSlide(path, mask_path, (height, width), mpp, sum(counts), tuple(shapes))
