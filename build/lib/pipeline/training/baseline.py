"""Classical nucleus segmentation baselines, the floor a trained U-Net must clear.

Both take an (H, W, 3) uint8 RGB H&E image at 0.5 µm/px and return ``(foreground mask, instance ids)``.
Every parameter is a fixed default chosen from nucleus sizes at 0.5 µm/px before looking at any score; none
is tuned on the evaluation images:

* ``otsu``: hematoxylin optical density of a colour deconvolution (``skimage.color.rgb2hed``, Ruifrok &
  Johnston's H&E-DAB matrix), Otsu's threshold over the whole image, holes filled, objects under
  ``MIN_AREA`` = 10 px (2.5 µm², far below the ~20 µm² of the smallest nuclei) removed; instances are
  the 8-connected components. Touching nuclei stay merged.
* ``watershed``: the same mask, split by a watershed of the negated Euclidean distance transform from
  markers at its local maxima at least ``MIN_PEAK_DISTANCE`` = 5 px (2.5 µm, about the radius of a small
  nucleus) apart; a component without a marker keeps its own id.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

MIN_AREA = 10  # px at 0.5 µm/px
MIN_PEAK_DISTANCE = 5  # px at 0.5 µm/px
EIGHT = np.ones((3, 3), bool)

Baseline = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def hematoxylin(image: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (float, higher = more stain) of an RGB uint8 image."""
    from skimage.color import rgb2hed

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return rgb2hed(image)[..., 0]


def otsu_mask(image: np.ndarray, min_area: int = MIN_AREA) -> np.ndarray:
    """Nucleus foreground: Otsu on the hematoxylin channel, holes filled, specks removed."""
    from skimage.filters import threshold_otsu

    stain = hematoxylin(image)
    if np.ptp(stain) == 0:  # a blank image has no threshold (and no nuclei)
        return np.zeros(stain.shape, bool)
    mask = ndimage.binary_fill_holes(stain > threshold_otsu(stain))
    labels, _ = ndimage.label(mask, EIGHT)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def otsu_baseline(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Otsu mask and its 8-connected components."""
    mask = otsu_mask(image)
    return mask, ndimage.label(mask, EIGHT)[0].astype(np.uint32)


def split_touching(mask: np.ndarray, min_distance: int = MIN_PEAK_DISTANCE) -> np.ndarray:
    """Instance ids of ``mask`` after a distance-transform watershed (ids 1..n, 0 = background)."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    components, count = ndimage.label(mask, EIGHT)
    if count == 0:
        return components.astype(np.uint32)
    distance = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=components, exclude_border=False)
    markers = np.zeros(mask.shape, np.int64)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    unmarked = np.setdiff1d(np.arange(1, count + 1), components[tuple(peaks.T)])
    lonely = np.isin(components, unmarked)  # components with no peak at all keep their own id
    markers[lonely] = len(peaks) + components[lonely]
    ids = watershed(-distance, markers, mask=mask, connectivity=2)
    _, ids = np.unique(ids, return_inverse=True)  # 1..n without gaps
    return ids.reshape(mask.shape).astype(np.uint32)


def watershed_baseline(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Otsu mask, touching nuclei split by the distance-transform watershed."""
    mask = otsu_mask(image)
    return mask, split_touching(mask)


BASELINES: dict[str, Baseline] = {"otsu": otsu_baseline, "watershed": watershed_baseline}
