"""Per-slide numbers from result stores: class areas, tissue area, object counts, densities and sizes.

Why: pathologists compare slides by tissue-normalised numbers (nuclei per mm² of tissue, nucleus size
distribution, area fraction of a class), not by masks. Everything is read out of core: class areas and
objects come from one block-by-block pass (:mod:`pipeline.analysis.components`), so a gigapixel mask never sits in
memory and objects cut by block borders are counted once. A store with an instance label image (``labels/nuclei``)
takes the objects of its seed class from the instances instead (:mod:`pipeline.analysis.instance_stats`).

Conventions: class 0 is background (never an object); areas in µm² use the store's µm/px (``mpp``) of the
segmented level, squared; a store without µm/px gets pixel columns only (µm columns empty, and a warning).
Tissue area comes from the store's ``tissue/mask`` when the run detected tissue; otherwise the same
detector runs on the slide's thumbnail (``detect_tissue``), and failing that the whole image counts.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.text import text_table
from pipeline.analysis.components import ComponentOptions, Components, connected_components
from pipeline.analysis.instance_stats import Instances, component_classes, default_object_classes, store_instances
from pipeline.slides.coordinates import store_level0_downsample
from pipeline.slides.inputs import InputKind, expand_inputs
from pipeline.slides.resolution import implausible_mpp
from pipeline.store.output_store import LABELS_PATH

logger = logging.getLogger(__name__)

STATISTICS = {10: "p10", 50: "median", 90: "p90"}  # percentiles of object areas, and their column names


class ResultStoreError(ValueError):
    """A path that is not a finished result store; the message names it and says what to do."""


@dataclass(frozen=True)
class AnalysisOptions:
    """``object_classes``: class names or indices counted as objects (None: every non-background class but those
    a store's instances absorbed, e.g. nucleus boundary).
    ``min_area_um2`` / ``min_area_px``: smaller objects (e.g. speckles of a few pixels) are left out of
    counts, densities and sizes (class areas keep every pixel); 0 keeps all, matching a plain labelling.
    ``detect_tissue``: without a stored tissue mask, detect tissue on the slide's thumbnail."""

    object_classes: tuple[str | int, ...] | None = None
    min_area_um2: float = 0.0
    min_area_px: int = 0
    detect_tissue: bool = True
    components: ComponentOptions = field(default_factory=ComponentOptions)


@dataclass
class StoreInfo:
    """What a finished store says about itself."""

    path: Path
    provenance: dict[str, Any]
    class_names: list[str]
    labels: zarr.Array

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".zarr")

    @property
    def mpp(self) -> float | None:
        mpp = self.provenance.get("mpp")
        return float(mpp) if mpp else None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.labels.shape)


def open_store(path: str | Path) -> StoreInfo:
    """Open a finished result store, or raise :class:`ResultStoreError` saying why it cannot be used."""
    path = Path(path)
    if not path.exists():
        raise ResultStoreError(f"{path}: no such result store; check the path")
    try:
        root = zarr.open_group(str(path), mode="r")
        provenance = dict(root.attrs["wsi_unet"])
        labels = root[f"{LABELS_PATH}/0"]
        ome = dict(root[LABELS_PATH].attrs["ome"])
    except Exception as error:
        raise ResultStoreError(
            f"{path}: not a wsi-unet result store ({type(error).__name__}: {error}); "
            "pass the <slide>.zarr folders written by segment_slides.py"
        ) from None
    status = provenance.get("status")
    if status != "complete":
        raise ResultStoreError(
            f"{path}: result is not complete (status {status!r}); rerun the segment_slides.py command that made it to finish it"
        )
    names = [p["class"] for p in ome.get("image-label", {}).get("properties", [])] or provenance.get("class_names")
    return StoreInfo(path, provenance, list(names), labels)


def resolve_classes(class_names: Sequence[str], wanted: Iterable[str | int] | None) -> list[int]:
    """Class indices for names or indices in ``wanted`` (None: every class but background, index 0)."""
    if wanted is None:
        return list(range(1, len(class_names)))
    indices = []
    for item in wanted:
        text = str(item)
        if text in class_names:
            indices.append(class_names.index(text))
        elif text.isdigit() and int(text) < len(class_names):
            indices.append(int(text))
        else:
            raise ValueError(f"unknown class {item!r}; this store's classes are {', '.join(class_names)}")
    return sorted(set(indices))


def is_store(path: Path) -> bool:
    return (path / "zarr.json").is_file()


STORES = InputKind(
    is_item=is_store, plural="result stores", missing="no such result store", folder_hint=" (<slide>.zarr folders)",
    in_folder=lambda p: p.suffix == ".zarr" and is_store(p),  # not the .creating-<pid> folder of a running job
)  # fmt: skip


def find_stores(inputs: Iterable[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Stores named by paths, directories of ``*.zarr`` stores (not recursive) and glob patterns, in order
    without duplicates; and [(input, reason)] for inputs that name none. A store is a folder with a
    ``zarr.json``; a named file is kept so that opening it reports what is wrong with it."""
    return expand_inputs(inputs, STORES)


# --------------------------------------------------------------------------- tissue
def stored_tissue_pixels(store: StoreInfo) -> float | None:
    """Tissue area in segmented-level pixels from ``tissue/mask`` (a low-resolution mask of the whole
    level: each mask pixel stands for (H / mask H) x (W / mask W) level pixels); None without one."""
    root = zarr.open_group(str(store.path), mode="r")
    if "tissue" not in root or "mask" not in root["tissue"]:
        return None
    mask = np.asarray(root["tissue/mask"][...]) > 0
    (height, width), (mh, mw) = store.shape, mask.shape
    return float(mask.sum()) * (height / mh) * (width / mw)


def detected_tissue_pixels(store: StoreInfo) -> float | None:
    """Tissue area from the run's own detector on the slide's thumbnail; None if the slide cannot be opened."""
    from pipeline.slides.pyramid import open_slide
    from pipeline.slides.tissue_tiles import slide_tissue_mask

    source = store.provenance.get("source")
    try:
        mask = slide_tissue_mask(open_slide(source, 0), True)
    except Exception as error:
        logger.warning("%s: tissue detection on the slide skipped: %s", store.path, error)
        return None
    return float(mask.mean()) * store.shape[0] * store.shape[1]


def tissue_pixels(store: StoreInfo, detect: bool) -> tuple[float, str]:
    """(tissue area in level pixels, where it came from: "stored mask", "detected" or "whole image")."""
    stored = stored_tissue_pixels(store)
    if stored is not None:
        return stored, "stored mask"
    detected = detected_tissue_pixels(store) if detect else None
    if detected is not None:
        return detected, "detected"
    logger.warning("%s: no tissue mask; densities are per mm² of the whole image, glass included", store.path)
    return float(store.shape[0] * store.shape[1]), "whole image"


# --------------------------------------------------------------------------- summary
@dataclass
class SlideSummary:
    """One slide's numbers; ``row()`` is its CSV row. ``components`` and ``instances`` feed the GeoJSON export."""

    store: StoreInfo
    class_pixels: np.ndarray
    tissue_pixels: float
    tissue_source: str
    object_classes: list[int]
    components: Components = field(repr=False)
    min_object_px: int = 0  # objects smaller than this are left out
    level0_downsample: float = 1.0  # level-0 pixels per stored pixel
    seconds: float = 0.0
    instances: Instances | None = field(default=None, repr=False)  # objects of instances.seed_class, when present

    @property
    def mpp(self) -> float | None:
        return self.store.mpp

    def um2(self, pixels: float) -> float | None:
        return pixels * self.mpp**2 if self.mpp else None

    def mm2(self, pixels: float) -> float | None:
        return pixels * self.mpp**2 / 1e6 if self.mpp else None

    @property
    def tissue_mm2(self) -> float | None:
        return self.mm2(self.tissue_pixels)

    def from_instances(self, cls: int) -> bool:
        return self.instances is not None and cls == self.instances.seed_class

    def objects_source(self, cls: int) -> str:
        """Where the objects of class ``cls`` come from, as the CSV and the table say it."""
        return self.instances.source if self.from_instances(cls) else "connected components"

    def object_areas(self, cls: int) -> np.ndarray:
        """Pixel areas of the objects of class ``cls`` (at least ``min_object_px`` each)."""
        areas = self.instances.sizes() if self.from_instances(cls) else self.components.areas(cls)
        return areas[areas >= self.min_object_px] if self.min_object_px > 1 else areas

    @property
    def mpp_warning(self) -> str | None:
        """One line when the store's full-resolution µm/px is outside what scanners write, else None."""
        return implausible_mpp(self.mpp / self.level0_downsample if self.mpp else None, str(self.store.path))

    def density(self, cls: int) -> float | None:
        """Objects of class ``cls`` per mm² of tissue."""
        tissue = self.tissue_mm2
        return len(self.object_areas(cls)) / tissue if tissue else None

    def object_fraction(self, cls: int) -> float | None:
        """Pixels of the (kept) objects of class ``cls`` over tissue; with instances, interior and boundary."""
        return float(self.object_areas(cls).sum()) / self.tissue_pixels if self.tissue_pixels else None

    def row(self) -> dict[str, Any]:
        info = self.store.provenance
        row: dict[str, Any] = {
            "slide": self.store.name, "store": str(self.store.path), "source": info.get("source"),
            "level": info.get("level"), "level0_downsample": self.level0_downsample,
            "mpp": self.mpp, "mpp_plausible": self.mpp_warning is None,
            "height_px": self.store.shape[0], "width_px": self.store.shape[1],
            "connectivity": self.components.connectivity, "min_object_px": self.min_object_px,
            "tissue_source": self.tissue_source,
            "tissue_area_px": round(self.tissue_pixels), "tissue_area_mm2": self.tissue_mm2,
        }  # fmt: skip
        for k, name in enumerate(self.store.class_names):
            pixels = int(self.class_pixels[k])
            key = column_name(name)
            row[f"{key}_area_px"] = pixels
            row[f"{key}_area_um2"] = self.um2(pixels)
            row[f"{key}_area_mm2"] = self.mm2(pixels)
            if k:  # background over tissue means nothing (glass, lumens and the skipped tiles are in it)
                row[f"{key}_fraction_of_tissue"] = pixels / self.tissue_pixels if self.tissue_pixels else None
        for k in self.object_classes:
            key = column_name(self.store.class_names[k])
            row[f"{key}_objects_from"] = self.objects_source(k)
            row.update(object_columns(key, self.object_areas(k), self.mpp, self.density(k)))
            row[f"{key}_objects_fraction_of_tissue"] = self.object_fraction(k)
        return row


def column_name(class_name: str) -> str:
    """A class name as a CSV column prefix: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_") or "class"


def object_columns(key: str, areas: np.ndarray, mpp: float | None, density: float | None) -> dict[str, Any]:
    """Count, density and size statistics (mean and 10th/50th/90th percentiles) in px and µm²."""
    columns: dict[str, Any] = {f"{key}_count": len(areas), f"{key}_per_mm2_tissue": density}
    stats = size_statistics(areas)
    for unit, factor in (("px", 1.0), ("um2", mpp**2 if mpp else None)):
        for stat, value in stats.items():
            columns[f"{key}_area_{stat}_{unit}"] = value * factor if value is not None and factor else None
    return columns


def size_statistics(areas: np.ndarray) -> dict[str, float | None]:
    """Mean and percentiles (numpy's linear interpolation) of object areas; None for no objects."""
    if len(areas) == 0:
        return dict.fromkeys(["mean", *STATISTICS.values()])
    values = np.percentile(areas, list(STATISTICS))
    return {"mean": float(np.mean(areas)), **{name: float(v) for name, v in zip(STATISTICS.values(), values)}}


def summarize_store(path: str | Path, options: AnalysisOptions = AnalysisOptions()) -> SlideSummary:
    """All numbers for one store in one out-of-core pass (plus the low-resolution tissue mask)."""
    started = time.perf_counter()
    store = open_store(path)
    instances = store_instances(store.path, store.provenance, store.class_names, options.components)
    object_classes = (default_object_classes(len(store.class_names), instances) if options.object_classes is None
                      else resolve_classes(store.class_names, options.object_classes))  # fmt: skip
    min_px = min_object_pixels(store, options)  # before the pass: a bad option fails at once
    labelled = component_classes(len(store.class_names), object_classes, instances)
    components = connected_components(store.labels, len(store.class_names), labelled, options.components)
    if store.mpp is None:
        logger.warning("%s: no µm/px in the store; µm² and mm² columns and densities are left empty", path)
    tissue, source = tissue_pixels(store, options.detect_tissue)
    summary = SlideSummary(
        store, components.class_pixels, tissue, source, object_classes, components, min_px,
        store_level0_downsample(store.provenance, store.path), time.perf_counter() - started, instances,
    )  # fmt: skip
    if summary.mpp_warning:
        logger.warning("%s", summary.mpp_warning)
    logger.info("%s: %d objects, %.1f s", store.name, sum(len(summary.object_areas(k)) for k in object_classes),
                summary.seconds)  # fmt: skip
    return summary


def min_object_pixels(store: StoreInfo, options: AnalysisOptions) -> int:
    """The smallest object kept, in pixels: the larger of ``min_area_px`` and ``min_area_um2`` in pixels."""
    pixels = options.min_area_px
    if options.min_area_um2 > 0:
        if store.mpp is None:
            raise ValueError(f"{store.path}: a minimum object area in µm² needs the µm/px, which this store lacks; "
                             "give it in pixels instead (--min-area-px)")  # fmt: skip
        pixels = max(pixels, math.ceil(options.min_area_um2 / store.mpp**2 - 1e-9))
    return int(pixels)


# --------------------------------------------------------------------------- outputs
def write_csv(summaries: Sequence[SlideSummary], path: str | Path) -> Path:
    """One row per slide; columns are the union over slides (stores with other classes leave cells empty)."""
    rows = [{_csv_text(k): v for k, v in s.row().items()} for s in summaries]  # class names come from the model file
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return path


def _csv_value(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else _csv_text(value) if isinstance(value, str) else value


def _csv_text(text: str) -> str:
    """Text a spreadsheet would run as a formula (``=cmd|...``, ``+``, ``-``, ``@``, tab, CR) gets a leading quote
    (OWASP's CSV-injection rule); slide names and class names come from files the user may not control."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def format_table(summaries: Sequence[SlideSummary]) -> str:
    """Plain-text table: per slide, tissue, where objects come from and, per object class, count, density,
    median size and % of tissue (with instances, of the instances' pixels)."""
    rows = [table_cells(s) for s in summaries]
    header = list(dict.fromkeys(title for row in rows for title in row))
    cells = [[row.get(title, "-") for title in header] for row in rows]
    return text_table(header, cells, right=[i > 0 for i in range(len(header))])


def table_cells(s: SlideSummary) -> dict[str, str]:
    cells = {"slide": s.store.name, "µm/px": _fmt(s.mpp, ".3f"), "tissue mm²": _fmt(s.tissue_mm2, ".3f"),
             "tissue from": s.tissue_source, "objects from": objects_sources(s)}  # fmt: skip
    for k in s.object_classes:
        name, areas = s.store.class_names[k], s.object_areas(k)
        median = s.um2(float(np.median(areas))) if len(areas) else None
        fraction = s.object_fraction(k) if s.from_instances(k) else (
            s.class_pixels[k] / s.tissue_pixels if s.tissue_pixels else None)  # fmt: skip
        percent = 100 * fraction if fraction is not None else None
        cells[f"{name} n"] = f"{len(areas):,}"
        cells[f"{name}/mm²"] = format_number(s.density(k))
        cells[f"{name} median µm²"] = _fmt(median, ".1f")
        cells[f"{name} % tissue"] = _fmt(percent, ".1f")
    return cells


def objects_sources(s: SlideSummary) -> str:
    """One source when all object classes share it, else "class: source" for each."""
    sources = {s.store.class_names[k]: s.objects_source(k) for k in s.object_classes}
    if len(set(sources.values())) <= 1:
        return next(iter(sources.values()), "-")
    return "; ".join(f"{name}: {source}" for name, source in sources.items())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_number(value: float | None) -> str:
    """Readable at any scale: thousands separators from 100 up, three significant digits below."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
