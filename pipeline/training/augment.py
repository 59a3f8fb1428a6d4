"""Data augmentation in numpy, driven by an explicit ``numpy.random.Generator`` (reproducible per sample).

* :func:`elastic_field` / :func:`warp`: the paper's smooth elastic deformation: random displacement
  vectors on a coarse grid (3 x 3, sigma 10 px), interpolated to every pixel with a cubic spline; the
  image is resampled with a cubic spline, labels (classes, instances) with nearest neighbour, so the two
  stay aligned pixel for pixel.
* :func:`flip_rotate`: one of the 8 symmetries of the square (flips and 90 degree rotations).
* :func:`stain_jitter`: H&E colour augmentation in HED space (colour deconvolution): each stain's
  concentration is scaled and shifted a little, then converted back to RGB; plus brightness/contrast.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def elastic_field(
    shape: tuple[int, int], rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """(2, H, W) per-pixel displacements: N(0, sigma) vectors on a ``grid`` x ``grid`` lattice spanning the
    patch (corners included), interpolated with a cubic spline."""
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    return interpolate_field(coarse, shape)


def interpolate_field(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Cubic-spline interpolation of a (2, g, g) coarse displacement lattice to (2, H, W)."""
    coarse = np.asarray(coarse, dtype=np.float64)
    g_y, g_x = coarse.shape[1:]
    ys = np.linspace(0, g_y - 1, shape[0])
    xs = np.linspace(0, g_x - 1, shape[1])
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    order = min(3, g_y - 1, g_x - 1)
    return np.stack(
        [ndimage.map_coordinates(c, [yy, xx], order=order, mode="nearest") for c in coarse]
    ).astype(np.float32)


def warp(
    array: np.ndarray, field: np.ndarray, order: int, out_shape: tuple[int, int] | None = None, offset: int = 0
) -> np.ndarray:
    """Resample ``array`` (H, W[, C]) at ``pixel + field``: output[y, x] = array[y + dy, x + dx].

    ``order``: 3 (cubic) for images, 0 (nearest) for labels. ``field`` is (2, h, w) for the output grid;
    ``offset`` shifts the output grid inside the input (to warp only a centre crop). Outside the array,
    values are mirrored.
    """
    h, w = field.shape[1:] if out_shape is None else out_shape
    yy, xx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    coords = [yy + offset + field[0], xx + offset + field[1]]
    if array.ndim == 2:
        return ndimage.map_coordinates(array, coords, order=order, mode="mirror")
    return np.stack(
        [ndimage.map_coordinates(array[..., c], coords, order=order, mode="mirror") for c in range(array.shape[-1])],
        axis=-1,
    )


def flip_rotate(arrays: list[np.ndarray], k: int) -> list[np.ndarray]:
    """Apply symmetry ``k`` in 0..7 (k % 4 quarter turns, then a left-right flip if k >= 4) to every array
    (H, W[, C]) alike."""
    out = []
    for array in arrays:
        array = np.rot90(array, k % 4, axes=(0, 1))
        if k >= 4:
            array = array[:, ::-1]
        out.append(np.ascontiguousarray(array))
    return out


def stain_jitter(
    rgb: np.ndarray, rng: np.random.Generator, scale: float = 0.05, shift: float = 0.05,
    brightness: float = 0.05, contrast: float = 0.1,
) -> np.ndarray:  # fmt: skip
    """H&E stain augmentation of an RGB float image in [0, 1] (returns float32 in [0, 1]).

    In HED space (skimage's colour deconvolution) each stain channel becomes h * a + b with
    a ~ U(1 - scale, 1 + scale) and b ~ U(-shift, shift) times that channel's spread; then a global
    contrast and brightness jitter. A zero ``scale``/``shift``/... leaves the image unchanged.
    """
    from skimage.color import hed2rgb, rgb2hed

    out = np.asarray(rgb, dtype=np.float32)
    if scale or shift:
        hed = rgb2hed(np.clip(out, 0.0, 1.0))
        spread = hed.reshape(-1, 3).std(axis=0) + 1e-3
        alpha = rng.uniform(1 - scale, 1 + scale, size=3)
        beta = rng.uniform(-shift, shift, size=3) * spread
        out = hed2rgb(hed * alpha + beta).astype(np.float32)
    if contrast or brightness:
        c = rng.uniform(1 - contrast, 1 + contrast)
        b = rng.uniform(-brightness, brightness)
        mean = out.mean()
        out = (out - mean) * c + mean + b
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def intensity_jitter(grey: np.ndarray, rng: np.random.Generator, brightness: float = 0.05, contrast: float = 0.1) -> np.ndarray:
    """Brightness/contrast jitter for non-H&E images (float in [0, 1])."""
    c = rng.uniform(1 - contrast, 1 + contrast)
    b = rng.uniform(-brightness, brightness)
    mean = float(np.mean(grey))
    return np.clip((np.asarray(grey, np.float32) - mean) * c + mean + b, 0.0, 1.0).astype(np.float32)
