"""Per-pixel loss weights of the U-Net paper (Ronneberger et al., 2015, eq. 2).

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))

``w_c`` balances the class frequencies; the second term is the *border weight*: d1 and d2 are the
Euclidean distances from a background pixel to the nearest and the second-nearest object, so the thin
background gaps between touching objects get a large weight and the network learns to separate them.
The border term is applied to background (class 0) pixels only: inside an object d1 is 0 and the term
would just re-weight object interiors near other objects, which is not what the separation border is for.
With ``contact=True`` it is also applied to the object pixels that touch another object (8-neighbours): where
two instances touch there is no background between them (in the nuclei set ~9 in 10 of the nuclei a model
merged touch another), so the only pixels that can part them are their own edges; there d1 = 0 and d2 is
the distance to the other object (1 or sqrt 2), so they get about w0.

Objects are instances: an instance label image is used as is; for binary or class-index labels they are
the connected components (4-connected) of each foreground class (:func:`instances_from_classes`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

W0 = 10.0
SIGMA = 5.0


def class_balance_weights(class_counts: np.ndarray) -> np.ndarray:
    """w_c per class, inverse to its pixel frequency and normalised so the mean weight per pixel is 1.

    ``class_counts[c]`` is the number of pixels of class c in the training set. Absent classes get the
    largest weight of the present ones (they cannot influence the mean, and a later-seen pixel of such a
    class should not get an unbounded weight).
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        return np.ones_like(counts, dtype=np.float32)
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    weights[present] = 1.0 / (present.sum() * freq[present])  # sum_c freq_c * w_c = 1
    weights[~present] = weights[present].max()
    return weights.astype(np.float32)


def instances_from_classes(classes: np.ndarray) -> np.ndarray:
    """Instance ids (0 = background) from a class map: 4-connected components of every class >= 1."""
    classes = np.asarray(classes)
    instances = np.zeros(classes.shape, dtype=np.int32)
    offset = 0
    for value in np.unique(classes):
        if value == 0:
            continue
        components, count = ndimage.label(classes == value)
        instances[components > 0] = components[components > 0] + offset
        offset += count
    return instances


def nearest_two_distances(instances: np.ndarray, cutoff: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """d1, d2: per pixel, the distance to the nearest and second-nearest object (inf if none).

    Each object's distance map is computed only inside its bounding box grown by ``cutoff`` pixels
    (exact there, since the whole object lies inside that box); farther pixels keep inf. With the border
    term that is lossless in practice: at d1 + d2 > cutoff = 6 sigma the term is below w0 * 1.6e-8.
    """
    instances = np.asarray(instances)
    height, width = instances.shape
    d1 = np.full(instances.shape, np.inf, dtype=np.float32)
    d2 = np.full(instances.shape, np.inf, dtype=np.float32)
    grow = int(np.ceil(cutoff)) if cutoff is not None else max(height, width)
    for index, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        y0, y1 = max(0, box[0].start - grow), min(height, box[0].stop + grow)
        x0, x1 = max(0, box[1].start - grow), min(width, box[1].stop + grow)
        region = instances[y0:y1, x0:x1]
        dist = ndimage.distance_transform_edt(region != index).astype(np.float32)
        r1, r2 = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]  # views: updated in place
        closer = dist < r1
        r2[...] = np.where(closer, r1, np.minimum(r2, dist))
        r1[...] = np.where(closer, dist, r1)
    return d1, d2


def contact_pixels(instances: np.ndarray, distance: int = 1) -> np.ndarray:
    """Object pixels with a pixel of another object within Chebyshev ``distance`` (1: an 8-neighbour;
    pixels beyond the array do not count): a larger id nearby shows in the window's maximum, a smaller one in
    its minimum over objects only (the test :func:`pipeline.training.files.split_boundaries` makes with
    background counted)."""
    ids = np.asarray(instances).astype(np.int64)
    size = 2 * distance + 1
    larger = ndimage.grey_dilation(ids, size=size, mode="nearest")
    beyond = ids.max(initial=0) + 1  # background as an id above all (not int64's max: ndimage overflows there)
    smaller = ndimage.grey_erosion(np.where(ids > 0, ids, beyond), size=size, mode="nearest")
    return (ids > 0) & ((larger != ids) | (smaller != ids))


def border_weight(instances: np.ndarray, w0: float = W0, sigma: float = SIGMA, contact: bool = False) -> np.ndarray:
    """w0 * exp(-(d1 + d2)^2 / 2 sigma^2) on background pixels (instance 0), and with ``contact`` on object
    pixels touching another object; 0 on other object pixels."""
    instances = np.asarray(instances)
    if w0 == 0 or instances.max(initial=0) == 0:
        return np.zeros(instances.shape, dtype=np.float32)
    d1, d2 = nearest_two_distances(instances, cutoff=6.0 * sigma)
    with np.errstate(invalid="ignore", over="ignore"):
        term = w0 * np.exp(-((d1 + d2) ** 2) / (2.0 * sigma**2))
    term = np.nan_to_num(term, nan=0.0, posinf=0.0).astype(np.float32)
    separating = instances == 0
    if contact:
        separating |= contact_pixels(instances)
    term[~separating] = 0.0
    return term


def weight_map(
    classes: np.ndarray,
    instances: np.ndarray | None = None,
    class_weights: np.ndarray | None = None,
    w0: float = W0,
    sigma: float = SIGMA,
    border: bool = True,
    contact: bool = False,
) -> np.ndarray:
    """The paper's w(x) for a class map (and its instances; derived by connected components if None).

    ``class_weights``: w_c per class (None = 1 for every class); ``border=False`` leaves only w_c;
    ``contact``: the border term also on object pixels touching another object (:func:`border_weight`).
    """
    classes = np.asarray(classes)
    if class_weights is None:
        weights = np.ones(classes.shape, dtype=np.float32)
    else:
        table = np.asarray(class_weights, dtype=np.float32)
        weights = table[np.clip(classes, 0, len(table) - 1)]
    if border and w0 > 0:
        if instances is None:
            instances = instances_from_classes(classes)
        weights = weights + border_weight(instances, w0, sigma, contact)
    return weights.astype(np.float32)
