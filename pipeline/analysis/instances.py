"""Nuclei instances from a class map: seeds of the nucleus class, grown a few pixels into the boundary rim.

Why: a 3-class model (background, nucleus interior, nucleus boundary) separates touching nuclei by their
boundary pixels; the interiors are the seeds, and growing them back over the rim gives each nucleus its
full extent. This module is the pure, whole-image reference (small numpy arrays); the out-of-core version
(:mod:`pipeline.analysis.instance_zarr`) reuses its pieces block by block and must give the very same ids.

Locality (what makes the block version exact): after ``k`` growth steps a pixel's id depends only on the
seeds and classes within Chebyshev distance ``k``. The image border is not padded: pixels beyond it do not
exist (a minimum filter whose outside is "no label").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.analysis.components import label_areas

NO_LABEL = np.iinfo(np.uint32).max  # "no id" inside grow: larger than every id, so the minimum ignores it


@dataclass(frozen=True)
class InstanceRule:
    """How a class map becomes instances. Seeds: the ``connectivity``-connected components of ``seed_class``
    with at least ``min_seed_area`` px. Each seed grows, ``grow_steps`` times, into 8-neighbouring unlabelled
    pixels whose class is ``seed_class`` or in ``grow_classes``; a pixel reached by several seeds in the same
    step takes the smallest id."""

    seed_class: int = 1
    grow_classes: tuple[int, ...] = (2,)
    grow_steps: int = 3
    min_seed_area: int = 4
    connectivity: int = 4  # of the seeds (4 or 8)
    name: str = "nuclei"  # the store's label image: labels/<name>

    def __post_init__(self) -> None:
        object.__setattr__(self, "grow_classes", tuple(int(c) for c in self.grow_classes))
        if self.connectivity not in (4, 8):
            raise ValueError(f"instances: connectivity must be 4 or 8, got {self.connectivity}")
        if self.grow_steps < 0 or self.min_seed_area < 1:
            raise ValueError(f"instances: grow_steps must be >= 0 and min_seed_area >= 1, got "
                             f"{self.grow_steps}, {self.min_seed_area}")  # fmt: skip
        if not all(0 <= c <= 255 for c in (self.seed_class, *self.grow_classes)):
            raise ValueError(f"instances: classes must be in 0..255 (a uint8 class map), got "
                             f"{self.seed_class}, {self.grow_classes}")  # fmt: skip
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name == "segmentation":
            raise ValueError(f"instances: name must be a plain label name other than 'segmentation', got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists): what the store's provenance records."""
        return {**asdict(self), "grow_classes": list(self.grow_classes)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceRule:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"instances: unknown keys {unknown}; known: {sorted(known)}")
        values = dict(d)
        if "grow_classes" in values:
            values["grow_classes"] = tuple(values["grow_classes"])
        return cls(**values)

    @classmethod
    def from_card(cls, card: Any) -> InstanceRule | None:
        """The rule a model carries in its card's metadata (``metadata["instances"]``, a dict), or None."""
        found = (getattr(card, "metadata", None) or {}).get("instances")
        if found is None:
            return None
        if not isinstance(found, dict):
            raise TypeError(f"instances: the model's metadata['instances'] must be a dict, got {type(found).__name__}")
        return cls.from_dict(found)

    @property
    def structure(self) -> np.ndarray:
        """The seeds' ``scipy.ndimage.label`` structuring element."""
        return ndimage.generate_binary_structure(2, 2 if self.connectivity == 8 else 1)

    def growable(self, class_map: np.ndarray) -> np.ndarray:
        """Pixels a seed may grow into (its own class or a grow class)."""
        lut = np.zeros(256, dtype=bool)
        lut[[self.seed_class, *self.grow_classes]] = True
        return lut[class_map]


def seed_components(class_map: np.ndarray, rule: InstanceRule) -> tuple[np.ndarray, int]:
    """``scipy.ndimage.label`` of the seed class: int32 labels 1..n in raster order of their first pixel."""
    return ndimage.label(class_map == rule.seed_class, structure=rule.structure)


def grow(seeds: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    """``seeds`` (uint32, 0 = none) grown ``steps`` times into unlabelled ``mask`` pixels: each step gives such a
    pixel the smallest id among its 8 neighbours (all steps simultaneous, so ties go to the smallest id): a 3 x 3
    minimum filter where 0 counts as +inf. Pixels beyond the array do not exist.

    Only the still-open mask pixels are visited (8 gathers each per step), and nothing else of the image is
    touched but one copy and one scan of ``mask``: a step costs in proportion to the rim, not the image.
    Returns a new uint32 array."""
    height, width = seeds.shape
    grown = np.array(seeds, dtype=np.uint32)  # a copy: the caller's seeds stay as they are
    flat = grown.ravel()
    where = np.flatnonzero(mask)
    where = where[flat[where] == 0]
    if steps <= 0 or not len(where):
        return grown
    rows, cols = np.divmod(where, width)
    # a neighbour exists unless the pixel lies on the side it is on; ids - 1 in uint32 turns "no id" (0) into the
    # largest value, so the minimum skips it, and + 1 turns "none reached" back into 0
    sides = {-1: rows > 0, 1: rows < height - 1}, {-1: cols > 0, 1: cols < width - 1}
    neighbours = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for _ in range(steps):
        reached = np.full(len(where), NO_LABEL, dtype=np.uint32)
        for dy, dx in neighbours:
            ids = np.take(flat, where + (dy * width + dx), mode="clip")  # off-image ones are masked below
            ids -= np.uint32(1)
            exists = sides[0][dy] & sides[1][dx] if dy and dx else sides[0][dy] if dy else sides[1][dx]
            ids[~exists] = NO_LABEL
            np.minimum(reached, ids, out=reached)
        reached += np.uint32(1)
        hit = reached != 0
        flat[where[hit]] = reached[hit]  # after every pixel's minimum was taken: the step is simultaneous
        keep = ~hit
        if not keep.any():
            break
        where = where[keep]
        sides = ({k: v[keep] for k, v in sides[0].items()}, {k: v[keep] for k, v in sides[1].items()})
    return grown


def label_instances(class_map: np.ndarray, rule: InstanceRule) -> np.ndarray:
    """Whole-image reference: uint32 ids 1..N, numbered in raster order of each seed's first pixel (as
    ``scipy.ndimage.label`` numbers components), seeds smaller than ``min_seed_area`` dropped (and the rest
    renumbered keeping that order), then grown. 0 = no instance."""
    labels, count = seed_components(class_map, rule)
    flat = labels.ravel()
    areas = label_areas(flat, np.flatnonzero(flat), count)
    ids = np.zeros(count + 1, dtype=np.uint32)
    keep = areas >= rule.min_seed_area
    ids[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    return grow(ids[labels], rule.growable(class_map), rule.grow_steps)
