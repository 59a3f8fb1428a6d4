"""Data augmentation in numpy, driven by an explicit ``numpy.random.Generator`` (reproducible per sample).

* :func:`elastic_field` / :func:`warp`: the paper's smooth elastic deformation: random displacement
  vectors on a coarse grid (3 x 3, sigma 10 px), interpolated to every pixel with a cubic spline; the
  image is resampled with a cubic spline, labels (classes, instances) with nearest neighbour, so the two
  stay aligned pixel for pixel.
* :func:`flip_rotate`: one of the 8 symmetries of the square (flips and 90 degree rotations).
* :func:`stain_jitter`: H&E colour augmentation in HED space (colour deconvolution): each stain's
  concentration is scaled and shifted a little, then converted back to RGB; plus brightness/contrast.
* :func:`draw_zoom` / :func:`zoom`: scanners and µm/px metadata differ; a patch is read over a larger or
  smaller area and resized (image linear with anti-aliasing, labels nearest at the same pixel centres).
* :func:`blur` and :func:`jpeg`: out-of-focus scans and the JPEG tiles most slide formats store.
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


def draw_zoom(rng: np.random.Generator, scale_range: tuple[float, float] | None, probability: float = 0.5) -> float:
    """1.0, or with ``probability`` a zoom drawn log-uniformly in ``scale_range`` (> 1 enlarges)."""
    if not scale_range or rng.random() >= probability:
        return 1.0
    low, high = scale_range
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def zoom(pixels: np.ndarray, labels: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a square (R, R, C) float image and its (R, R) labels to ``side``: the image linearly (with
    anti-aliasing when shrinking), the labels by nearest neighbour at the same pixel centres."""
    from skimage.transform import resize

    read = pixels.shape[0]
    if read == side:
        return pixels, labels
    image = resize(pixels, (side, side), order=1, anti_aliasing=read > side, preserve_range=True).astype(np.float32)
    index = np.minimum(((np.arange(side) + 0.5) * read / side).astype(int), read - 1)
    return image, labels[index][:, index]


def blur(pixels: np.ndarray, rng: np.random.Generator, max_sigma: float, probability: float = 0.25) -> np.ndarray:
    """Gaussian blur of sigma ~ U(0.3, ``max_sigma``) px per spatial axis, for ``probability`` of the patches."""
    if max_sigma <= 0 or rng.random() >= probability:
        return pixels
    sigma = rng.uniform(min(0.3, max_sigma), max_sigma)
    return ndimage.gaussian_filter(pixels, sigma=(sigma, sigma, 0), mode="reflect")


def jpeg(pixels: np.ndarray, rng: np.random.Generator, quality: tuple[int, int] | None, probability: float = 0.25) -> np.ndarray:
    """Re-encode a float RGB image in [0, 1] as JPEG at a quality ~ U(``quality``), for ``probability`` of the patches."""
    if not quality or pixels.shape[-1] != 3 or rng.random() >= probability:
        return pixels
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(quality[0], quality[1] + 1))
    )
    buffer.seek(0)
    with Image.open(buffer) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
