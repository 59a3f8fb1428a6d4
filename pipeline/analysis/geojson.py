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
"""

from __future__ import annotations

import json
import logging
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import shapely
from rasterio.errors import NotGeoreferencedWarning
from shapely.geometry import shape as geometry_from_mapping

from pipeline.analysis.summary import StoreInfo, open_store, resolve_classes
from pipeline.analysis.components import ComponentOptions, Components, block_boxes, connected_components, label_block, map_blocks
from pipeline.slides.coordinates import store_level0_downsample
from pipeline.store.durability import atomic_file
from pipeline.store.output_store import PALETTE

logger = logging.getLogger(__name__)
ID_NAMESPACE = uuid.UUID("5d1f0a3c-7e4b-4c55-9a8e-0b6f2f1e6c11")  # wsi-unet features: uuid5(ID_NAMESPACE, ...)


@dataclass(frozen=True)
class GeoJSONOptions:
    """``classes``: classes to export (names or indices; None: every non-background class).
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
    from rasterio import features
    from rasterio.transform import Affine

    y0, x0, y1, x1 = box
    block = np.asarray(array[y0:y1, x0:x1])
    labels, _ = label_block(block, classes, structure)
    wanted = (labels > 0) & np.isin(block, exported)
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
) -> int:
    """Write the store's objects as a QuPath-ready GeoJSON FeatureCollection; returns the feature count.

    ``components``: the result of the components pass when it was already run (e.g. by
    :func:`pipeline.analysis.summary.summarize_store`, with the same connectivity and block size); else it is run here.
    """
    store = open_store(store_path)
    labelled = tuple(range(1, len(store.class_names)))
    if components is None:
        components = connected_components(store.labels, len(store.class_names), labelled, options.components)
    exported = tuple(resolve_classes(store.class_names, options.classes))
    detections = (
        set(exported) if options.detections is None else set(resolve_classes(store.class_names, options.detections))
    )
    properties = class_properties(store, detections)
    downsample = store_level0_downsample(store.provenance, store.path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_path) as partial, open(partial, "w", encoding="utf-8") as handle:
        writer = FeatureWriter(handle, downsample, options.decimals)
        emit = _emitter(writer, store, components, properties, options.min_area_px)
        _stream_objects(store, components, exported, options.components, emit)
        writer.close()
    logger.info("%s: %d features -> %s (level-0 px = %.4g x stored px)", store.name, writer.count, out_path, downsample)
    return writer.count


def _emitter(writer: FeatureWriter, store: StoreInfo, components: Components, properties: dict[int, dict],
             min_area_px: int):  # fmt: skip
    mpp = store.mpp

    def emit(component: int, geometry: Any) -> None:
        cls = int(components.component_class[component])
        area = int(components.component_area[component])
        if area < min_area_px:
            return
        measurements = {"Area px": area, **({"Area µm^2": round(area * mpp**2, 4)} if mpp else {})}
        feature_id = str(uuid.uuid5(ID_NAMESPACE, f"{store.name}/{component}"))
        writer.write(geometry, feature_id, {**properties[cls], "measurements": measurements})

    return emit


def _stream_objects(store: StoreInfo, components: Components, exported: tuple[int, ...],
                    options: ComponentOptions, emit) -> None:  # fmt: skip
    """Polygonise block by block, in order; emit each object as soon as its last block is done."""
    boxes = block_boxes(store.shape, components.block)
    batch = max(1, 4 * options.num_workers)
    structure = ComponentOptions(connectivity=components.connectivity).structure
    pending: dict[int, list] = defaultdict(list)
    for start in range(0, len(boxes), batch):
        indices = range(start, min(len(boxes), start + batch))
        results = map_blocks(block_polygons, store.labels, [boxes[i] for i in indices], options,
                             components.classes, structure, exported)  # fmt: skip
        for index, polygons in zip(indices, results):
            touched = set()
            for local, geometry in polygons.items():
                component = int(components.label_component[components.offsets[index] + local - 1])
                if components.component_labels[component] == 1:
                    emit(component, geometry)
                else:
                    pending[component].append(geometry)
                    touched.add(component)
            for component in sorted(touched):
                if components.component_last_block[component] == index:
                    emit(component, merge_pieces(pending.pop(component)))
    if pending:  # cannot happen when components match the store; never write a silently short file
        raise RuntimeError(f"{store.path}: {len(pending)} objects were left unmerged; the components do not match")
