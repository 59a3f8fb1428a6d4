"""The output mosaic: a Zarr v3 group in OME-Zarr 0.5 form where every chunk has exactly one writer.

Layout of ``<slide>.zarr`` (documented in the README)::

    zarr.json                       ome: {version: 0.5}; wsi_unet: provenance + status ("running"/"complete")
    labels/zarr.json                ome: {labels: ["segmentation"]}
    labels/segmentation/            multiscales + image-label (class colours and names)
        0/                          uint8 class index, (y, x) at the segmented level; Zarr v3 shards of
                                    shard_tiles x shard_tiles tiles, inner chunk = output chunk (for viewers)
        1/ .. k/                    2x nearest-neighbour pyramid for viewers, sharded alike, built after all shards
    probabilities/0/                optional (c, y, x) uint8 softmax * 255, sharded like level 0
    tiles/tissue                    (rows, cols) uint8, one chunk: 1 tile run, 0 skipped (no tissue)
    shards/done                     (shard rows, shard cols) uint8, one byte file per finished shard

A shard is the unit of writing and of work: its tiles are run together and the shard is written whole,
once, by one writer (no partial-shard writes, no read-modify-write, no locks; a retried shard rewrites
the same bytes). A shard without tissue is never run and needs no file. Crash safety, in order:

- the store is built in ``<name>.zarr.creating-<pid>`` (arrays, metadata, tissue mask, skipped tiles), synced
  whole, and renamed into place, so ``<name>.zarr`` is either absent or fully created; an overwrite moves the
  old store to ``<name>.zarr.replaced-<pid>`` first, which the next run puts back if the new one never arrived;
- a shard's files (and their folders) are fsync'ed before it is marked done, then the mark, so "done"
  means durably on disk (:mod:`pipeline.store.durability`);
- ``status: complete`` is written last (zarr writes ``zarr.json`` by temp file + rename, then it is synced),
  only after ``shards/done`` shows every shard with tissue done and the pyramid is built and synced;
- the metadata depends on the slide and settings only (counts come from the tissue grid), so a store
  finished by ``resume`` is byte-identical to one written in a single run.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.slides.geometry import Shard, TileGrid
from pipeline.store.durability import durable_mkdir, durable_replace, sync_files, sync_tree
from pipeline.store.slide_overview import write_overview
from pipeline.store.label_pyramid import LABELS_PATH, build_pyramid, level_shard_side, pyramid_shapes, shard_levels
from pipeline.store.locking import check_lock_owner
from pipeline.store.shard_state import (
    DONE_PATH, TILE_DONE, TILE_PENDING, TILE_SKIPPED, TISSUE_PATH, mark_shard_done, read_done_shards, read_tissue,
    tile_states,
)  # fmt: skip

logger = logging.getLogger(__name__)

LOCK_CHECK_SECONDS = 5.0
__all__ = ["OutputStore", "create_output_store", "open_existing_store", "TILE_DONE", "TILE_PENDING", "TILE_SKIPPED"]
PALETTE = [  # class 0 transparent; class 1 green, which stands out on H&E's pinks and purples
    (0, 0, 0, 0), (0, 230, 60, 255), (255, 225, 25, 255), (0, 130, 200, 255), (230, 25, 75, 255),
    (245, 130, 48, 255), (145, 30, 180, 255), (70, 240, 240, 255), (240, 50, 230, 255), (210, 245, 60, 255),
]  # fmt: skip


class OutputExistsError(FileExistsError):
    """The output store exists and neither overwrite nor resume was asked for."""


@dataclass
class OutputStore:
    """Handles to an output store's arrays; picklable by path (workers reopen with mode ``r+``)."""

    path: str
    grid: TileGrid
    lock_token: str | None = None  # the batch's lock on this store: writes stop if another job takes it over
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)  # opened once per process
    _lock_checked: float = field(default=-LOCK_CHECK_SECONDS, repr=False, compare=False)
    _named: set = field(default_factory=set, repr=False, compare=False)  # folders whose names are durable
    _with_shards: int | None = field(default=None, repr=False, compare=False)  # pyramid levels written per shard

    def __getstate__(self) -> dict:  # handles are reopened on the worker, the lock checked again
        return {"path": self.path, "grid": self.grid, "lock_token": self.lock_token, "_arrays": {},
                "_lock_checked": -LOCK_CHECK_SECONDS, "_named": set(), "_with_shards": None}  # fmt: skip

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(f"{self.path}/{name}", mode="r+")
        return self._arrays[name]

    @property
    def root(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r+")

    def labels(self, level: int = 0) -> zarr.Array:
        return self._array(f"{LABELS_PATH}/{level}")

    def write_shard(self, shard: Shard, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Write one shard whole (its ``box``; ``labels`` (h, w), ``probabilities`` (K, h, w)), make it durable,
        then mark it done (durably). The only writer of its shard files; a retry rewrites the same bytes."""
        self.check_lock()  # before any byte: a job that lost its lock writes nothing more
        y0, x0, y1, x1 = shard.box
        labels = labels[: y1 - y0, : x1 - x0]
        written = {f"{LABELS_PATH}/0": self.labels()}
        written[f"{LABELS_PATH}/0"][y0:y1, x0:x1] = labels
        for level in range(1, self._shard_levels() + 1):  # its own shard of each: see label_pyramid
            step, name = 2**level, f"{LABELS_PATH}/{level}"
            written[name] = self.labels(level)
            written[name][y0 // step : -(-y1 // step), x0 // step : -(-x1 // step)] = labels[::step, ::step]
        if probabilities is not None:
            written["probabilities/0"] = self._array("probabilities/0")
            written["probabilities/0"][:, y0:y1, x0:x1] = probabilities[:, : y1 - y0, : x1 - x0]
        for name, array in written.items():
            key = array.metadata.encode_chunk_key((0,) * (array.ndim - 2) + (shard.row, shard.col))
            sync_files([Path(self.path, name, key)], Path(self.path, name), self._named)
        mark_shard_done(self.path, self._array(DONE_PATH), shard.row, shard.col, self._named)

    def _shard_levels(self) -> int:
        """Pyramid levels written with each shard (1..n): those whose shards halve the level-0 shard's side."""
        if self._with_shards is None:
            group = zarr.open_group(f"{self.path}/{LABELS_PATH}", mode="r")
            levels = sum(1 for name in group.array_keys() if name.isdigit())
            self._with_shards = shard_levels(self.grid.shard_side, self.labels().chunks[0], levels)
        return self._with_shards

    def check_lock(self, force: bool = False) -> None:
        """Raise :class:`~pipeline.store.locking.StoreLockLostError` if another job took this store's lock over.

        Only for stores written under a lock (``lock_token`` set by the batch); checked at most every
        ``LOCK_CHECK_SECONDS`` per process, so a job that lost its lock stops writing within seconds."""
        if self.lock_token is None or (not force and time.monotonic() < self._lock_checked + LOCK_CHECK_SECONDS):
            return
        check_lock_owner(self.path, self.lock_token)
        self._lock_checked = time.monotonic()

    def tile_states(self) -> np.ndarray:
        """(rows, cols) per tile: ``TILE_DONE``, ``TILE_SKIPPED`` (no tissue) or ``TILE_PENDING``."""
        return tile_states(read_tissue(self.path), read_done_shards(self.path), self.grid.shard_tiles)

    def done_shards(self) -> np.ndarray:
        """(shard rows, shard cols) bool: the shards written whole and marked done."""
        return read_done_shards(self.path)

    def finalize(self, slide: Any = None, derived: Callable[[str], dict[str, Any]] | None = None) -> None:
        """Build the viewer pyramid (and, given the ``slide``, the root image of it), then mark the store complete:
        last, and only if every shard is in. ``derived(path)``: label images made from the finished mask (the
        instances: :func:`pipeline.analysis.instance_labels.finalize_instances`), before ``complete``; it returns
        provenance entries to record."""
        states = self.tile_states()
        missing = int((states == TILE_PENDING).sum())
        if missing:
            raise RuntimeError(f"{self.path}: {missing} tiles are not written yet; not marking it complete")
        self.check_lock(force=True)  # now, not up to LOCK_CHECK_SECONDS ago
        build_pyramid(self.path, first=self._shard_levels() + 1)  # the levels below came with their shards
        if slide is not None:  # before the provenance is read: zarr rewrites a group's attributes whole
            levels = len(zarr.open_group(f"{self.path}/{LABELS_PATH}", mode="r").attrs["ome"]["multiscales"][0]["datasets"])
            made = read_provenance(Path(self.path))
            write_overview(self.path, slide, made.get("mpp"), levels, full=made.get("slide_image") == "full")
        recorded = derived(self.path) if derived is not None else {}
        root = self.root
        info = dict(root.attrs["wsi_unet"])
        info.update(tiles_segmented=int((states == TILE_DONE).sum()),
                    tiles_skipped=int((states == TILE_SKIPPED).sum()))  # fmt: skip
        info.update(recorded)
        info["status"] = "complete"
        root.attrs["wsi_unet"] = info
        sync_files([Path(self.path, "zarr.json")], Path(self.path))  # zarr wrote it by temp file + rename

    @property
    def status(self) -> str | None:
        return (read_provenance(Path(self.path)) or {}).get("status")


def open_existing_store(
    path: str | Path, grid: TileGrid, provenance: dict[str, Any], *, overwrite: bool = False, resume: bool = False,
    replace_other_slides: bool = True,
) -> OutputStore | None:
    """The existing store at ``path`` to resume, or None when a new one is to be created.

    Refuses (:class:`OutputExistsError`) an existing output unless ``resume`` and it was made with the
    same settings, or ``overwrite`` (then None: the caller creates a new one that replaces it). With
    ``replace_other_slides=False`` (the batch, whose output names are derived from slide names),
    ``overwrite`` never replaces a store made from another slide file that maps to the same name.
    """
    path = Path(path)
    remove_stale_siblings(path)
    if not path.exists():
        return None
    existing = read_provenance(path)
    if overwrite:
        if not replace_other_slides and existing is not None and not same_source(existing, provenance):
            raise OutputExistsError(
                f"{path}: holds the result of another slide ({existing.get('source')}), not of "
                f"{provenance.get('source')}; --overwrite replaces only a slide's own output (slides are compared by "
                "path; a relative one is read from the current folder): move the old store away, or write this slide "
                "to another --out"
            )
        return None
    if resume and existing is not None:
        _check_resumable(path, existing, provenance)
        store = OutputStore(str(path), grid)
        if existing.get("status") != "complete":
            removed = remove_partial_files(path)
            logger.info("%s: resuming (%d tiles done earlier%s)", path, int((store.tile_states() > 0).sum()),
                        f", {removed} stray temp files removed" if removed else "")  # fmt: skip
        return store
    what = "a complete result" if (existing or {}).get("status") == "complete" else "an unfinished or foreign store"
    raise OutputExistsError(
        f"{path}: output exists ({what}); pass overwrite=True (--overwrite) to replace it"
        + (" or resume=True to finish it" if existing is not None and not resume else "")
    )


def same_source(existing: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether a store was made from the same slide file (paths compared resolved, so ``./a.svs`` is ``a.svs``)."""
    old, new = existing.get("source"), wanted.get("source")
    return old == new or (isinstance(old, str) and isinstance(new, str) and Path(old).resolve() == Path(new).resolve())


def create_output_store(
    path: str | Path,
    grid: TileGrid,
    *,
    chunk: int,
    class_names: list[str],
    mpp: float | None,
    provenance: dict[str, Any],
    probabilities: bool = False,
    tissue_mask: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
) -> OutputStore:
    """Create the store once, in the driver, atomically: built beside ``path`` and renamed into place.

    An existing store at ``path`` is replaced only after the new one is complete on disk (callers
    decide whether that is allowed, see :func:`open_existing_store`). ``tissue_mask`` (low resolution)
    is kept under ``tissue/mask``; ``tissue`` (rows, cols), the tiles to run (None: all), under ``tiles/tissue``.
    """
    path = Path(path)
    durable_mkdir(path.parent)
    remove_stale_siblings(path)
    building = path.with_name(f"{path.name}.creating-{os.getpid()}")
    try:
        _build_store(building, grid, chunk, class_names, mpp, provenance, probabilities, tissue_mask, tissue)
        sync_tree(building)  # every file and folder of the new store is on disk before its name appears
    except BaseException:
        _remove(building)
        raise
    if not path.exists():
        durable_replace(building, path)
        return OutputStore(str(path), grid)
    # overwrite: move the old one aside, then the new one in; a crash in between leaves the old one as
    # <name>.replaced-<pid>, which the next run puts back (remove_stale_siblings): never neither
    retired = path.with_name(f"{path.name}.replaced-{os.getpid()}")
    durable_replace(path, retired)
    try:
        durable_replace(building, path)
    except BaseException:
        durable_replace(retired, path)
        _remove(building)
        raise
    _remove(retired)
    return OutputStore(str(path), grid)


def _build_store(
    path: Path, grid: TileGrid, chunk: int, class_names: list[str], mpp: float | None, provenance: dict[str, Any],
    probabilities: bool, tissue_mask: np.ndarray | None, tissue: np.ndarray | None,
) -> None:  # fmt: skip
    num_classes = len(class_names)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5"}
    root.attrs["wsi_unet"] = {**provenance, "status": "running"}
    labels_group = root.create_group("labels")
    labels_group.attrs["ome"] = {"version": "0.5", "labels": ["segmentation"]}
    segmentation = labels_group.create_group("segmentation")
    shapes = pyramid_shapes(grid.shape, chunk)
    side = grid.shard_side
    with_shards = shard_levels(side, chunk, len(shapes))
    for level, shape in enumerate(shapes):
        level_side = level_shard_side(side, level, with_shards)
        segmentation.create_array(
            str(level), shape=shape, chunks=(chunk, chunk), shards=(level_side, level_side), dtype="uint8",
            fill_value=0, dimension_names=["y", "x"],
        )  # fmt: skip
    segmentation.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [_multiscales("segmentation", ["y", "x"], len(shapes), mpp)],
        "image-label": {
            "version": "0.5",
            "colors": [{"label-value": k, "rgba": list(PALETTE[k % len(PALETTE)])} for k in range(num_classes)],
            "properties": [{"label-value": k, "class": name} for k, name in enumerate(class_names)],
        },
    }
    if probabilities:
        group = root.create_group("probabilities")
        group.create_array(
            "0", shape=(num_classes, *grid.shape), chunks=(num_classes, chunk, chunk),
            shards=(num_classes, side, side), dtype="uint8", fill_value=0, dimension_names=["c", "y", "x"],
        )  # fmt: skip
        group.attrs["ome"] = {"version": "0.5", "multiscales": [_multiscales("probabilities", ["c", "y", "x"], 1, mpp,
                                                                                      "softmax x 255 per class, one level")]}
    if tissue_mask is not None:
        group = root.create_group("tissue")
        group.create_array("mask", data=tissue_mask.astype(np.uint8), chunks=tissue_mask.shape, dimension_names=["y", "x"])
        group.attrs["scale"] = float(tissue_mask.shape[0] / grid.shape[0])  # mask pixels per segmented-level pixel
    run = np.ones((grid.rows, grid.cols), dtype=np.uint8) if tissue is None else tissue.astype(np.uint8)
    root.create_array(TISSUE_PATH, data=run, chunks=run.shape, compressors=None, dimension_names=["row", "col"])
    root.create_array(DONE_PATH, shape=(grid.shard_rows, grid.shard_cols), chunks=(1, 1), dtype="uint8",
                      fill_value=0, compressors=None, dimension_names=["row", "col"])  # fmt: skip


def _remove(path: Path) -> None:
    """Remove a file, folder or symbolic link (a link is removed, never followed)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_stale_siblings(path: Path) -> None:
    """Clean up what a killed creation left beside ``path`` (the caller holds the store's lock, so it is stale).

    ``<name>.creating-<pid>`` (a store being built) is removed. ``<name>.replaced-<pid>`` is the store an
    overwrite moved aside: if the new one never got its name, the old one is put back; otherwise removed.
    Only exactly these names: another slide's store (``<name>.creating-7.zarr``) is never touched."""
    pattern = re.compile(re.escape(path.name) + r"\.(creating|replaced)-[0-9]+")
    siblings = sorted((p for p in path.parent.glob(f"{glob.escape(path.name)}.*") if pattern.fullmatch(p.name)),
                      key=lambda p: p.stat().st_mtime if not p.is_symlink() else 0)  # fmt: skip
    for sibling in siblings:
        if sibling.name.startswith(f"{path.name}.replaced-") and not path.exists():
            logger.warning("%s: restoring the store an interrupted --overwrite had moved aside (%s)", path, sibling.name)
            durable_replace(sibling, path)
            continue
        logger.info("%s: removing %s left by an interrupted run", path, sibling.name)
        _remove(sibling)


def remove_partial_files(path: Path) -> int:
    """Delete zarr's ``*.partial`` temp files that a killed writer left (a resumed store must hold none)."""
    removed = 0
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    return removed


def _multiscales(name: str, axes: list[str], levels: int, mpp: float | None,
                 description: str = "class map; each level takes every other pixel of the one above") -> dict[str, Any]:
    """NGFF 0.5 multiscales, with the ``type`` and ``metadata`` the strict schemas ask for."""
    unit = {"unit": "micrometer"} if mpp else {}
    axis_meta = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", **unit} for a in axes]
    base = mpp or 1.0
    datasets = []
    for level in range(levels):
        scale = [1.0 if a == "c" else base * 2**level for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"name": name, "axes": axis_meta, "datasets": datasets, "type": "nearest",
            "metadata": {"description": description}}


def read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs["wsi_unet"])
    except Exception:
        return None


RESUME_KEYS = (
    "source", "level", "shape", "mpp", "tile_size", "chunk", "halo", "model_checksum", "probabilities", "tissue",
    "pixels", "shard_tiles",
)  # fmt: skip


def _check_resumable(path: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    changed = [k for k in RESUME_KEYS if k != "source" and existing.get(k) != wanted.get(k)]
    if not same_source(existing, wanted):
        changed.insert(0, "source")
    if "pixels" in changed and "pixels" not in existing:  # made before reads were native (2026-12)
        if existing.get("level", 0) == 0 or float(existing.get("level0_downsample") or 1).is_integer():
            changed.remove("pixels")  # level 0 and whole-number downsamples were read exactly then too
        else:
            raise OutputExistsError(
                f"{path}: cannot resume, an earlier version wrote it reading level {existing.get('level')} with a "
                "sub-pixel shift per tile (seams); use overwrite=True (--overwrite) to segment it again"
            )
    if "shard_tiles" in changed and "shard_tiles" not in existing:
        raise OutputExistsError(
            f"{path}: cannot resume, an earlier version wrote it with one chunk and one state file per tile (no "
            "shards); use overwrite=True (--overwrite) to segment it again"
        )
    if changed:
        raise OutputExistsError(
            f"{path}: cannot resume, the existing store was made with other settings ({', '.join(changed)}); "
            "use overwrite=True (--overwrite) to start again"
        )


def open_labels(path: str | Path, level: int = 0) -> zarr.Array:
    return zarr.open_array(f"{path}/{LABELS_PATH}/{level}", mode="r")
