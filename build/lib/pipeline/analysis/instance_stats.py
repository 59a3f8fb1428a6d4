"""Object sizes from a store's instance label image (``labels/<name>``, e.g. ``labels/nuclei``), out of core.

Why: with a model that draws nucleus boundaries (classes background, nucleus, nucleus boundary), touching nuclei
are one class-1 connected component but separate instances; the nuclei a pathologist counts are the instances
(interior and boundary pixels), so counts, densities and sizes come from them when a store has them.

Layout read here: ``labels/<name>/0`` is a uint32 array of the shape and chunks of ``labels/segmentation/0``,
ids 1..N unique across the slide (0: no instance); lower levels, if any, are nearest-neighbour pyramids. The
store's provenance may carry ``"instances": {"rule": {"name", "seed_class", "grow_classes"}, "count": N}``.
Sizes come from one block-by-block pass (the blocks of :mod:`pipeline.analysis.components`): each block's ids and
pixel counts are added into one array of N + 1 sizes, so memory is a block per worker plus a few numbers per id.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.analysis.components import ComponentOptions, batches_of_rows, block_boxes, grid_of, map_blocks

logger = logging.getLogger(__name__)
DEFAULT_NAME = "nuclei"
DEFAULT_SEED_CLASS = 1


@dataclass
class Instances:
    """The instance label image of a store and what the pass measured. Per-id arrays are indexed by id (0: none).

    ``seed_class``: the class whose objects the instances are (e.g. nucleus); ``grow_classes``: classes the
    instances absorbed (e.g. nucleus boundary), which are then no objects of their own."""

    name: str
    array: zarr.Array = field(repr=False)
    seed_class: int
    grow_classes: tuple[int, ...]
    block: tuple[int, int] = (0, 0)
    areas: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64), repr=False)  # pixels per id
    last_block: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64), repr=False)  # row-major index
    block_count: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int32), repr=False)  # blocks holding it

    @property
    def path(self) -> str:
        return f"labels/{self.name}"

    @property
    def source(self) -> str:
        """What the summary's "objects from" column says."""
        return f"instances ({self.path})"

    @property
    def classes(self) -> tuple[int, ...]:
        return (self.seed_class, *self.grow_classes)

    @property
    def count(self) -> int:
        return int(np.count_nonzero(self.areas[1:]))

    def sizes(self) -> np.ndarray:
        """Pixel areas of every instance, in id order (ids that never occur are left out)."""
        areas = self.areas[1:]
        return areas[areas > 0]


def instance_rule(provenance: dict[str, Any]) -> dict[str, Any]:
    """The rule the store's instances were made with (empty when the provenance does not say)."""
    instances = provenance.get("instances")
    return dict(instances.get("rule") or {}) if isinstance(instances, dict) else {}


def open_instances(path: str | Path, provenance: dict[str, Any], num_classes: int) -> Instances | None:
    """The store's instance labels (not yet measured), or None when it has none."""
    rule = instance_rule(provenance)
    name = str(rule.get("name") or DEFAULT_NAME)
    root = zarr.open_group(str(path), mode="r")
    try:
        array = root[f"labels/{name}/0"]
    except KeyError:
        if "instances" in provenance:
            logger.warning("%s: provenance names instances labels/%s but the store has none; objects are "
                           "connected components", path, name)  # fmt: skip
        return None
    seed = int(rule.get("seed_class", DEFAULT_SEED_CLASS))
    grow = tuple(int(k) for k in rule.get("grow_classes", ()) if int(k) != seed)
    if not 0 < seed < num_classes or any(not 0 < k < num_classes for k in grow):
        raise ValueError(f"{path}: instance rule {rule} names classes outside 1..{num_classes - 1}")
    return Instances(name, array, seed, grow)


def default_object_classes(num_classes: int, instances: Instances | None) -> list[int]:
    """Every class but background, less the classes instances absorbed (a nucleus boundary is no object)."""
    absorbed = set(instances.grow_classes) if instances else set()
    return [k for k in range(1, num_classes) if k not in absorbed]


def component_classes(num_classes: int, object_classes: Sequence[int], instances: Instances | None) -> list[int]:
    """Classes labelled into connected components: every non-background class (GeoJSON exports regions too), less
    the instances' classes unless asked for as objects (the seed class's objects are the instances)."""
    skip = (set(instances.classes) - set(object_classes)) | {instances.seed_class} if instances else set()
    return [k for k in range(1, num_classes) if k not in skip]


def block_ids(array, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, pixel counts) of the instances in one block; sparse, since ids run to N across the slide."""
    y0, x0, y1, x1 = box
    ids = np.asarray(array[y0:y1, x0:x1]).ravel()
    found, counts = np.unique(ids[ids > 0], return_counts=True)
    return found.astype(np.int64), counts.astype(np.int64)


def _fit(array: np.ndarray, size: int) -> np.ndarray:
    """``array`` zero-padded to at least ``size`` entries (ids past the provenance's count still fit)."""
    if len(array) >= size:
        return array
    grown = np.zeros(max(size, 2 * len(array)), dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def measure_instances(instances: Instances, options: ComponentOptions, expected: int = 0) -> Instances:
    """Fill in the size, last block and block count of every id in one out-of-core pass; returns ``instances``.

    ``expected``: the number of instances the provenance records (preallocates the per-id arrays)."""
    array = instances.array
    block = options.block_shape(tuple(array.chunks))
    grid, boxes = grid_of(array.shape, block), block_boxes(tuple(array.shape), block)
    size = expected + 1
    areas, last, count = np.zeros(size, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int32)
    top = 0
    for rows in batches_of_rows(grid, options.blocks_per_batch):
        first = rows.start * grid[1]
        results = map_blocks(block_ids, array, boxes[first : rows.stop * grid[1]], options)
        for index, (ids, pixels) in enumerate(results, start=first):
            if not len(ids):
                continue
            top = max(top, int(ids[-1]))
            areas, last, count = (_fit(a, top + 1) for a in (areas, last, count))
            areas[ids] += pixels
            last[ids] = index  # blocks come in row-major order: the last write is the last block
            count[ids] += 1
    instances.block, instances.areas = block, areas[: top + 1]
    instances.last_block, instances.block_count = last[: top + 1], count[: top + 1]
    if expected and instances.count != expected:
        logger.warning("%s: %d instances found, the provenance records %d", instances.path, instances.count, expected)
    return instances


def store_instances(path: str | Path, provenance: dict[str, Any], class_names: Sequence[str],
                    options: ComponentOptions) -> Instances | None:  # fmt: skip
    """The store's instances, measured; None for a store without them."""
    instances = open_instances(path, provenance, len(class_names))
    if instances is None:
        return None
    recorded = provenance.get("instances") or {}
    return measure_instances(instances, options, int(recorded.get("count") or 0))


def instance_level(instances: Instances, shape: tuple[int, int]) -> np.ndarray:
    """The instance ids at ``shape`` (a pyramid level of the class mask): the level of that shape when the
    instance pyramid has one, else nearest-neighbour samples of the smallest level at least that big."""
    levels = _levels(instances)
    match = next((a for a in levels if tuple(a.shape) == tuple(shape)), None)
    if match is not None:
        return np.asarray(match[...])
    source = next((a for a in reversed(levels) if all(s >= t for s, t in zip(a.shape, shape))), levels[0])
    rows = (np.arange(shape[0]) * source.shape[0]) // shape[0]
    cols = (np.arange(shape[1]) * source.shape[1]) // shape[1]
    logger.debug("%s: no level of shape %s; sampling %s", instances.path, shape, source.shape)
    return np.asarray(source.oindex[rows, cols])


def _levels(instances: Instances) -> list[zarr.Array]:
    """Level 0 and the pyramid levels below it, largest first."""
    group = zarr.open_group(store=instances.array.store, path=instances.path, mode="r")
    keys = sorted(int(k) for k in group.array_keys() if k.isdigit())
    return [group[str(k)] for k in keys]
