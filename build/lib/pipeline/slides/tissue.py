"""Tissue detection on slide thumbnails, and which tiles need the network at all.

Why: most of a whole-slide image is glass. A cheap low-resolution mask lets the engine skip tiles that
cannot contain nuclei. Mistakes are asymmetric: a skipped tissue tile loses results silently, an extra
glass tile only costs time, so every choice here leans towards keeping tiles.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

log = logging.getLogger(__name__)

# Saturation threshold = Otsu clamped to [SAT_FLOOR, SAT_CAP]. With glass and tissue both present, Otsu
# splits them but lands near the middle of the stained population (often 0.15-0.3), which would drop pale
# tissue (faint eosin, fat, mucus: S ~ 0.08-0.15); capping it keeps them. On a blank or glass-only
# thumbnail Otsu splits JPEG/sensor noise (S < 0.03), so the floor stops noise from becoming "tissue".
# Limitation: glass with a strong colour cast (S > SAT_CAP) would be kept; the brightness test helps.
SAT_FLOOR = 0.04
SAT_CAP = 0.10
# Near-white test on the darkest channel (0-255): glass is bright in all channels, even pale pink tissue
# has a clearly darker green channel. Saturated-looking JPEG fringes on glass are bright, so they fail.
BRIGHT_MAX = 225


def _saturation_darkest(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation (0-1) and the darkest channel (0-255) of a uint8 RGB(A) image."""
    img = rgb[..., :3]
    mx, mn = img.max(axis=-1).astype(np.float32), img.min(axis=-1)
    return (mx - mn) / np.maximum(mx, 1), mn


def saturation_threshold(sat: np.ndarray) -> float:
    """Otsu on saturation, clamped to [SAT_FLOOR, SAT_CAP]; a constant image gives the floor."""
    flat = np.asarray(sat, np.float32).ravel()
    if flat.size == 0 or float(flat.max() - flat.min()) < 1e-6:
        return SAT_FLOOR
    return float(min(max(filters.threshold_otsu(flat), SAT_FLOOR), SAT_CAP))


def tissue_mask(
    rgb: np.ndarray,
    min_object_px: int | None = None,
    closing_radius: int = 2,
    bright_max: float = BRIGHT_MAX,
) -> np.ndarray:
    """Boolean tissue mask of an RGB(A) thumbnail (any low resolution, e.g. 1/32 of level 0).

    A pixel is tissue when it is both saturated (HSV S above the clamped Otsu threshold, see SAT_CAP) and
    not near white (darkest channel below `bright_max`). The mask is then closed (joins nuclei and stroma),
    opened (drops specks of dust), hole-filled (lumens and fat are part of the specimen), and objects
    smaller than `min_object_px` (default 0.005% of the thumbnail, at least 4 px) are removed.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] not in (3, 4) or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"tissue_mask: expected an (H, W, 3|4) RGB thumbnail, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:  # float images in 0-1 are scaled; anything else is taken as 0-255
        scale = 255.0 if rgb.dtype.kind == "f" and float(np.nanmax(rgb[..., :3])) <= 1.0 else 1.0
        rgb = np.clip(np.nan_to_num(rgb.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    sat, darkest = _saturation_darkest(rgb)
    thr = saturation_threshold(sat)
    mask = (sat > thr) & (darkest < bright_max)
    if not mask.any():
        return mask
    pad = max(closing_radius, 1) + 1  # work on a padded copy so objects touching the border are not eroded
    mask = np.pad(mask, pad)
    if closing_radius > 0:
        mask = ndimage.binary_closing(mask, structure=morphology.disk(closing_radius))
    mask = ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))[pad:-pad, pad:-pad]
    mask = ndimage.binary_fill_holes(mask)
    if min_object_px is None:
        min_object_px = max(4, mask.size // 20000)
    if min_object_px > 1:
        labels, n = ndimage.label(mask)
        if n:
            sizes = np.bincount(labels.ravel())
            keep = sizes >= min_object_px
            keep[0] = False
            mask = keep[labels]
    log.debug("tissue_mask: saturation threshold %.3f, tissue %.1f%%", thr, 100 * mask.mean())
    return mask


def tiles_with_tissue(
    mask: np.ndarray, mask_scale: float, tile_boxes: Sequence[tuple[int, int, int, int]]
) -> np.ndarray:
    """Which tiles contain tissue: one bool per (y0, x0, y1, x1) box given in level pixels.

    `mask_scale` is mask pixels per level pixel (e.g. 1/32). Each box is mapped to mask pixels rounding
    outwards and tested against the mask dilated by one pixel, so tissue at the resolution limit of the
    thumbnail (or on a box edge) keeps its tile. Boxes outside the mask are treated as glass.
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"tiles_with_tissue: mask must be 2-D, got shape {mask.shape}")
    if not mask_scale > 0:
        raise ValueError(f"tiles_with_tissue: mask_scale must be > 0, got {mask_scale}")
    boxes = np.asarray(tile_boxes, np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return np.zeros(0, bool)
    grown = ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool))
    # Summed-area table: any tissue in a box is one O(1) lookup however many tiles there are.
    sat = np.zeros((grown.shape[0] + 1, grown.shape[1] + 1), np.int64)
    sat[1:, 1:] = grown.cumsum(0).cumsum(1)
    eps = 1e-9  # boxes exactly on mask pixel edges must not grow by a pixel from float error
    y0 = np.clip(np.floor(boxes[:, 0] * mask_scale + eps), 0, grown.shape[0]).astype(np.int64)
    x0 = np.clip(np.floor(boxes[:, 1] * mask_scale + eps), 0, grown.shape[1]).astype(np.int64)
    y1 = np.clip(np.ceil(boxes[:, 2] * mask_scale - eps), 0, grown.shape[0]).astype(np.int64)
    x1 = np.clip(np.ceil(boxes[:, 3] * mask_scale - eps), 0, grown.shape[1]).astype(np.int64)
    y1, x1 = np.maximum(y1, y0), np.maximum(x1, x0)
    return (sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]) > 0


def load_mask_image(path: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Read a user-supplied tissue mask (PNG/TIFF/...; nonzero = tissue) resized (nearest) to `shape`."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            img = np.asarray(tifffile.imread(path))
        else:
            from PIL import Image

            with Image.open(path) as im:
                img = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - any reader failure means the same thing to the user
        raise ValueError(f"{path}: cannot read tissue mask ({exc}); give a PNG or TIFF image") from exc
    img = np.squeeze(img)
    if img.ndim == 3:  # colour / RGBA / multi-channel: tissue where any channel is nonzero
        img = img.any(axis=-1) if img.shape[-1] <= 4 else img.any(axis=0)
    if img.ndim != 2 or img.size == 0:
        raise ValueError(f"{path}: tissue mask must be a 2-D image, got shape {img.shape}")
    h, w = int(shape[0]), int(shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"load_mask_image: target shape {shape} must be positive")
    # Nearest neighbour by pixel centres, without PIL's size limits or dtype restrictions.
    rows = np.minimum(((np.arange(h) + 0.5) * img.shape[0] / h).astype(np.int64), img.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * img.shape[1] / w).astype(np.int64), img.shape[1] - 1)
    return np.asarray(img != 0)[np.ix_(rows, cols)]
