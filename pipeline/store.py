"""The output mosaic: a Zarr v3 group in OME-Zarr 0.5 form where every chunk has exactly one writer.

Layout of ``<slide>.zarr`` (documented in the README)::

    zarr.json                       ome: {version: 0.5}; wsi_unet: provenance + status ("running"/"complete")
    labels/zarr.json                ome: {labels: ["segmentation"]}
    labels/segmentation/            multiscales + image-label (class colours and names)
        0/                          uint8 class index, (y, x) at the segmented level, chunk = output chunk
        1/ .. k/                    2x nearest-neighbour pyramid for viewers, built after all tiles
    probabilities/0/                optional (c, y, x) uint8 softmax * 255, one chunk per tile per class block
    tiles/state                     (rows, cols) uint8: 0 pending, 1 segmented, 2 skipped (no tissue); chunk 1 x 1

A tile's valid centre covers whole chunks, so its write is independent of every other tile (no
read-modify-write, no locks; a retried tile rewrites the same bytes). The tile's state is written after
its pixels, and the group is marked complete only after the pyramid, so a crash never leaves a store
that looks finished and ``resume`` re-runs exactly the tiles without state.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import zarr

from pipeline.geometry import Tile, TileGrid

logger = logging.getLogger(__name__)

TILE_PENDING, TILE_DONE, TILE_SKIPPED = 0, 1, 2
LABELS_PATH = "labels/segmentation"
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
    _arrays: dict = field(default_factory=dict, repr=False, compare=False)  # opened once per process

    def __getstate__(self) -> dict:
        return {"path": self.path, "grid": self.grid, "_arrays": {}}  # handles are reopened on the worker

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = zarr.open_array(f"{self.path}/{name}", mode="r+")
        return self._arrays[name]

    @property
    def root(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r+")

    def labels(self, level: int = 0) -> zarr.Array:
        return self._array(f"{LABELS_PATH}/{level}")

    def write_tile(self, tile: Tile, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Write one tile's valid centre (whole chunks only) and then mark it done."""
        y0, x0, y1, x1 = tile.box
        self.labels()[y0:y1, x0:x1] = labels[: tile.height, : tile.width]
        if probabilities is not None:
            self._array("probabilities/0")[:, y0:y1, x0:x1] = probabilities[:, : tile.height, : tile.width]
        self._array("tiles/state")[tile.row, tile.col] = TILE_DONE

    def mark_skipped(self, tiles: list[Tile]) -> None:
        """Record background tiles in one write; called by the driver before any worker starts."""
        if not tiles:
            return
        array = self._array("tiles/state")
        states = array[...]
        for tile in tiles:
            states[tile.row, tile.col] = TILE_SKIPPED
        array[...] = states

    def tile_states(self) -> np.ndarray:
        return zarr.open_array(f"{self.path}/tiles/state", mode="r")[...]

    def finalize(self, extra: dict[str, Any] | None = None) -> None:
        """Build the viewer pyramid from level 0 and mark the store complete (last, so never on failure)."""
        build_pyramid(self.path)
        root = self.root
        info = dict(root.attrs["wsi_unet"])
        info.update(extra or {})
        info["status"] = "complete"
        root.attrs["wsi_unet"] = info


def pyramid_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """Level shapes, halving until the whole level fits in one chunk."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > chunk:
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    return shapes


def create_output_store(
    path: str | Path,
    grid: TileGrid,
    *,
    chunk: int,
    class_names: list[str],
    mpp: float | None,
    provenance: dict[str, Any],
    probabilities: bool = False,
    overwrite: bool = False,
    resume: bool = False,
) -> OutputStore:
    """Create the store's arrays once, in the driver; or reopen it for ``resume`` if it matches."""
    path = Path(path)
    store = OutputStore(str(path), grid)
    if path.exists():
        existing = _read_provenance(path)
        if resume and existing is not None:
            _check_resumable(path, existing, provenance)
            logger.info("%s: resuming (%d tiles already done)", path, int((store.tile_states() > 0).sum()))
            return store
        if not overwrite:
            what = "a complete result" if (existing or {}).get("status") == "complete" else "an unfinished or foreign store"
            raise OutputExistsError(
                f"{path}: output exists ({what}); pass overwrite=True (--overwrite) to replace it"
                + (" or resume=True (--resume) to finish it" if existing is not None else "")
            )
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    num_classes = len(class_names)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.attrs["ome"] = {"version": "0.5"}
    root.attrs["wsi_unet"] = {**provenance, "status": "running"}
    labels_group = root.create_group("labels")
    labels_group.attrs["ome"] = {"version": "0.5", "labels": ["segmentation"]}
    segmentation = labels_group.create_group("segmentation")
    shapes = pyramid_shapes(grid.shape, chunk)
    for level, shape in enumerate(shapes):
        segmentation.create_array(
            str(level), shape=shape, chunks=(chunk, chunk), dtype="uint8", fill_value=0, dimension_names=["y", "x"]
        )
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
            "0", shape=(num_classes, *grid.shape), chunks=(num_classes, chunk, chunk), dtype="uint8",
            fill_value=0, dimension_names=["c", "y", "x"],
        )  # fmt: skip
        group.attrs["ome"] = {"version": "0.5", "multiscales": [_multiscales("probabilities", ["c", "y", "x"], 1, mpp)]}
    tiles = root.create_group("tiles")
    tiles.create_array("state", shape=(grid.rows, grid.cols), chunks=(1, 1), dtype="uint8", fill_value=0)
    return store


def _multiscales(name: str, axes: list[str], levels: int, mpp: float | None) -> dict[str, Any]:
    unit = {"unit": "micrometer"} if mpp else {}
    axis_meta = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", **unit} for a in axes]
    base = mpp or 1.0
    datasets = []
    for level in range(levels):
        scale = [1.0 if a == "c" else base * 2**level for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"name": name, "axes": axis_meta, "datasets": datasets}


def _read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs["wsi_unet"])
    except Exception:
        return None


RESUME_KEYS = ("source", "level", "shape", "tile_size", "chunk", "halo", "model_checksum", "probabilities")


def _check_resumable(path: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    changed = [k for k in RESUME_KEYS if existing.get(k) != wanted.get(k)]
    if changed:
        raise OutputExistsError(
            f"{path}: cannot resume, the existing store was made with other settings ({', '.join(changed)}); "
            "use overwrite=True (--overwrite) to start again"
        )


def build_pyramid(path: str | Path) -> None:
    """Fill levels 1..k of the label pyramid by 2x nearest-neighbour from the level below, chunk-aligned.

    Dask streams it block by block (bounded memory); target blocks match the Zarr chunks exactly, so each
    chunk again has one writer.
    """
    group = zarr.open_group(f"{path}/{LABELS_PATH}", mode="r+")
    level = 1
    while str(level) in group:
        source = da.from_zarr(group[str(level - 1)])
        target = group[str(level)]
        down = source[::2, ::2].rechunk(target.chunks)
        da.store(down, target, lock=False, scheduler="threads")
        level += 1


def open_labels(path: str | Path, level: int = 0) -> zarr.Array:
    return zarr.open_array(f"{path}/{LABELS_PATH}/{level}", mode="r")
