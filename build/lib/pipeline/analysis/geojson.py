"""GeoJSON export of segmented objects and regions, for QuPath and other review tools.

What QuPath imports (File > Import objects, or drag and drop): a FeatureCollection whose features are
Polygons or MultiPolygons in level-0 pixel coordinates of the slide, with ``properties.objectType``
("detection" for objects such as nuclei, "annotation" for regions) and ``properties.classification``
(``{"name": class name, "color": [r, g, b]}``). Each feature is one connected object of one class
(connectivity as in :mod:`pipeline.analysis.components`), with its holes, and a deterministic UUID ``id``.

How: blocks of the mask are polygonised one at a time with GDAL's polygonize (``rasterio.features.shapes``:
exact pixel-edge rings, holes kept) on dask's threaded scheduler; an object that lies in one block is
written at once, the pieces of an object cut by block borders are kept until its last block has been
read (known from the components pass) and then merged with shapely into one feature. The file is
streamed feature by feature and renamed into place when complete. Memory: a small batch of blocks plus
the pieces of objects that are still open, never the whole mask.

Instances: a store with an instance label image (``labels/nuclei``, :mod:`pipeline.analysis.instance_stats`)
gets one feature per instance id instead of the connected objects of the instances' classes (touching nuclei
stay apart), traced and merged across blocks the same way, with ``instance_id`` in its properties.
"""

from __future__ import annotations

import json
import logging
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import shape as geometry_from_mapping

from pipeline.analysis.summary import StoreInfo, open_store, resolve_classes
from pipeline.analysis.components import ComponentOptions, Components, block_boxes, connected_components, label_block, map_blocks
from pipeline.analysis.instance_stats import Instances, component_classes, default_object_classes, store_instances
from pipeline.slides.coordinates import store_level0_downsample
from pipeline.store.durability import atomic_file
from pipeline.store.output_store import PALETTE

logger = logging.getLogger(__name__)
ID_NAMESPACE = uuid.UUID("5d1f0a3c-7e4b-4c55-9a8e-0b6f2f1e6c11")  # wsi-unet features: uuid5(ID_NAMESPACE, ...)


@dataclass(frozen=True)
class GeoJSONOptions:
    """``classes``: classes to export (names or indices; None: every non-background class but those a store's
    instances absorbed, e.g. nucleus boundary).
    ``detections``: of those, the ones written as QuPath detections (None: all); the rest are annotations.
    ``min_area_px``: smaller objects are not written (as in :class:`pipeline.analysis.summary.AnalysisOptions`).
    ``decimals``: rounding of level-0 coordinates when the downsample is not a whole number."""

    classes: tuple[str | int, ...] | None = None
    detections: tuple[str | int, ...] | None = None
    min_area_px: int = 0
    decimals: int = 3
    components: ComponentOptions = field(default_factory=ComponentOptions)


def block_polygons(array, box: tuple[int, int, int, int], classes: tuple[int, ...], structure: np.ndarray,
                   exported: tuple[int, ...]) -> dict[int, Any]:  # fmt: skip
    """{local label: shapely geometry in segmented-level pixels} for the exported classes of one block.

    Labels are those of :func:`pipeline.analysis.components.label_block` (same classes, same structure), so they
    map to the components pass's objects. GDAL traces 4-connected pieces; a label made of several
    (8-connectivity, corner contacts) becomes their union, a MultiPolygon touching at corners.
    """
    y0, x0, y1, x1 = box
    block = np.asarray(array[y0:y1, x0:x1])
    labels, _ = label_block(block, classes, structure)
    return trace(labels, (labels > 0) & np.isin(block, exported), x0, y0)


def instance_polygons(array, box: tuple[int, int, int, int]) -> dict[int, Any]:
    """{instance id: shapely geometry in segmented-level pixels} for the instances in one block."""
    y0, x0, y1, x1 = box
    ids = np.asarray(array[y0:y1, x0:x1])
    found, local = np.unique(ids, return_inverse=True)  # GDAL traces int32 at most; ids are uint32
    local = local.reshape(ids.shape).astype(np.int32)
    return {int(found[value]): geometry for value, geometry in trace(local, ids > 0, x0, y0).items()}


def trace(labels: np.ndarray, wanted: np.ndarray, x0: int, y0: int) -> dict[int, Any]:
    """{label: geometry} of the ``wanted`` pixels of an int32 label block whose top-left pixel is (x0, y0)."""
    from rasterio import features
    from rasterio.transform import Affine

    if not wanted.any():
        return {}
    parts: dict[int, list] = defaultdict(list)
    with warnings.catch_warnings():  # pixel coordinates on purpose: no CRS (only here, not for the whole process)
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        shapes = features.shapes(labels, mask=wanted, connectivity=4, transform=Affine.translation(x0, y0))
        for mapping, value in shapes:
            parts[int(value)].append(geometry_from_mapping(mapping))
    return {label: merge_pieces(pieces) for label, pieces in parts.items()}


def merge_pieces(pieces: list) -> Any:
    """One valid geometry from pixel-edge pieces that share edges or corners (exact: no tolerance)."""
    if len(pieces) == 1:
        geometry = pieces[0]
        return geometry if geometry.is_valid else shapely.make_valid(geometry)
    return shapely.simplify(shapely.union_all(pieces), 0)  # drops the collinear vertices left on old borders


class FeatureWriter:
    """Streams a FeatureCollection: header, one feature per call, footer on close."""

    def __init__(self, handle: TextIO, downsample: float, decimals: int):
        self.handle, self.downsample, self.decimals = handle, downsample, decimals
        self.count = 0
        handle.write('{"type": "FeatureCollection", "features": [\n')

    def to_level0(self, geometry: Any) -> Any:
        """Scale segmented-level pixel edges to level-0 pixels; exterior rings counter-clockwise (RFC 7946)."""
        if self.downsample != 1:
            factor, decimals = self.downsample, self.decimals
            exact = float(factor).is_integer()
            geometry = shapely.transform(geometry, lambda xy: xy * factor if exact else np.round(xy * factor, decimals))
        return shapely.orient_polygons(geometry)

    def write(self, geometry: Any, feature_id: str, properties: dict[str, Any]) -> None:
        text = shapely.to_geojson(self.to_level0(geometry))
        separator = ",\n" if self.count else ""
        self.handle.write(f'{separator}{{"type": "Feature", "id": "{feature_id}", "geometry": {text}, '
                          f'"properties": {json.dumps(properties, ensure_ascii=False)}}}')  # fmt: skip
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]}\n")


def class_properties(store: StoreInfo, detections: set[int]) -> dict[int, dict[str, Any]]:
    """QuPath properties per class: objectType and classification (name and the store's palette colour)."""
    return {
        k: {
            "objectType": "detection" if k in detections else "annotation",
            "classification": {"name": name, "color": list(PALETTE[k % len(PALETTE)][:3])},
        }
        for k, name in enumerate(store.class_names)
    }


def export_geojson(
    store_path: str | Path,
    out_path: str | Path,
    options: GeoJSONOptions = GeoJSONOptions(),
    components: Components | None = None,
    instances: Instances | None = None,
) -> int:
    """Write the store's objects as a QuPath-ready GeoJSON FeatureCollection; returns the feature count.

    ``components`` / ``instances``: the results of the components and instances passes when they were already run
    (e.g. by :func:`pipeline.analysis.summary.summarize_store`, with the same connectivity and block size); else they
    are run here. With instances, their seed class is exported one feature per instance.
    """
    store = open_store(store_path)
    num_classes = len(store.class_names)
    if instances is None:
        instances = store_instances(store.path, store.provenance, store.class_names, options.components)
    exported = tuple(default_object_classes(num_classes, instances) if options.classes is None
                     else resolve_classes(store.class_names, options.classes))  # fmt: skip
    with_instances = instances is not None and instances.seed_class in exported
    regions = tuple(k for k in exported if not (with_instances and k == instances.seed_class))
    if components is None and regions:
        labelled = component_classes(num_classes, exported, instances)
        components = connected_components(store.labels, num_classes, labelled, options.components)
    detections = (
        set(exported) if options.detections is None else set(resolve_classes(store.class_names, options.detections))
    )
    properties = class_properties(store, detections)
    downsample = store_level0_downsample(store.provenance, store.path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as partial, open(partial, "w", encoding="utf-8") as handle:
        writer = FeatureWriter(handle, downsample, options.decimals)
        if with_instances:
            emit = _instance_emitter(writer, store, instances, properties, options.min_area_px)
            _stream(store, instances.array, instances.block, options.components, instance_polygons, (),
                    _instance_pieces(instances), emit)  # fmt: skip
        if regions:
            emit = _emitter(writer, store, components, properties, options.min_area_px)
            structure = ComponentOptions(connectivity=components.connectivity).structure
            _stream(store, store.labels, components.block, options.components, block_polygons,
                    (components.classes, structure, regions), _component_pieces(components), emit)  # fmt: skip
        writer.close()
    logger.info("%s: %d features -> %s (level-0 px = %.4g x stored px)", store.name, writer.count, out_path, downsample)
    return writer.count


def _measurements(area: int, mpp: float | None) -> dict[str, Any]:
    return {"Area px": area, **({"Area µm^2": round(area * mpp**2, 4)} if mpp else {})}


def _emitter(writer: FeatureWriter, store: StoreInfo, components: Components, properties: dict[int, dict],
             min_area_px: int):  # fmt: skip
    def emit(component: int, geometry: Any) -> None:
        cls = int(components.component_class[component])
        area = int(components.component_area[component])
        if area < min_area_px:
            return
        feature_id = str(uuid.uuid5(ID_NAMESPACE, f"{store.name}/{component}"))
        writer.write(geometry, feature_id, {**properties[cls], "measurements": _measurements(area, store.mpp)})

    return emit


def _instance_emitter(writer: FeatureWriter, store: StoreInfo, instances: Instances, properties: dict[int, dict],
                      min_area_px: int):  # fmt: skip
    def emit(instance: int, geometry: Any) -> None:
        area = int(instances.areas[instance])
        if area < min_area_px:
            return
        feature_id = str(uuid.uuid5(ID_NAMESPACE, f"{store.name}/{instances.name}/{instance}"))
        writer.write(geometry, feature_id, {**properties[instances.seed_class], "instance_id": instance,
                                            "measurements": _measurements(area, store.mpp)})  # fmt: skip

    return emit


@dataclass(frozen=True)
class Pieces:
    """How a block's polygons map to whole objects: ``key(block index, label)`` is the object, ``blocks(object)``
    the number of blocks holding part of it, ``last(object)`` the row-major index of the last of them."""

    key: Callable[[int, int], int]
    blocks: Callable[[int], int]
    last: Callable[[int], int]


def _component_pieces(components: Components) -> Pieces:
    return Pieces(
        key=lambda index, local: int(components.label_component[components.offsets[index] + local - 1]),
        blocks=lambda component: int(components.component_labels[component]),  # block labels, >= blocks
        last=lambda component: int(components.component_last_block[component]),
    )


def _instance_pieces(instances: Instances) -> Pieces:
    return Pieces(key=lambda index, instance: instance, blocks=lambda i: int(instances.block_count[i]),
                  last=lambda i: int(instances.last_block[i]))  # fmt: skip


def _stream(store: StoreInfo, array, block: tuple[int, int], options: ComponentOptions, polygons_of,
            args: Sequence, pieces: Pieces, emit) -> None:  # fmt: skip
    """Polygonise ``array`` block by block, in order (``polygons_of(array, box, *args)``); emit each object as soon
    as its last block is done."""
    boxes = block_boxes(store.shape, block)
    batch = max(1, 4 * options.num_workers)
    pending: dict[int, list] = defaultdict(list)
    for start in range(0, len(boxes), batch):
        indices = range(start, min(len(boxes), start + batch))
        results = map_blocks(polygons_of, array, [boxes[i] for i in indices], options, *args)
        for index, polygons in zip(indices, results):
            touched = set()
            for local, geometry in polygons.items():
                key = pieces.key(index, local)
                if pieces.blocks(key) == 1:
                    emit(key, geometry)
                else:
                    pending[key].append(geometry)
                    touched.add(key)
            for key in sorted(touched):
                if pieces.last(key) == index:
                    emit(key, merge_pieces(pending.pop(key)))
    if pending:  # cannot happen when the passes match the store; never write a silently short file
        raise RuntimeError(f"{store.path}: {len(pending)} objects were left unmerged; the passes do not match it")
