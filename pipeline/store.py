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
read-modify-write, no locks; a retried tile rewrites the same bytes). Crash safety, in order:

- the store is built in ``<name>.zarr.creating-<pid>`` (arrays, metadata, tissue mask, skipped tiles) and
  renamed into place, so ``<name>.zarr`` is either absent or fully created;
- a tile's chunk files are fsync'ed before its state is written, so "done" means durably on disk;
- ``status: complete`` is written last (zarr writes ``zarr.json`` by temp file + rename), only after
  ``tiles/state`` shows every tile done or skipped and the pyramid is built;
- the metadata depends on the slide and settings only (counts come from ``tiles/state``), so a store
  finished by ``resume`` is byte-identical to one written in a single run.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        """Write one tile's valid centre (whole chunks only), make it durable, then mark it done."""
        y0, x0, y1, x1 = tile.box
        written = [self.labels()]
        written[0][y0:y1, x0:x1] = labels[: tile.height, : tile.width]
        if probabilities is not None:
            written.append(self._array("probabilities/0"))
            written[1][:, y0:y1, x0:x1] = probabilities[:, : tile.height, : tile.width]
        for array in written:
            sync_region(self.path, array, tile.box)
        self._array("tiles/state")[tile.row, tile.col] = TILE_DONE

    def tile_states(self) -> np.ndarray:
        return read_tile_states(self.path)

    def finalize(self) -> None:
        """Build the viewer pyramid and mark the store complete: last, and only if every tile is in."""
        states = self.tile_states()
        missing = int((states == TILE_PENDING).sum())
        if missing:
            raise RuntimeError(f"{self.path}: {missing} tiles are not written yet; not marking it complete")
        build_pyramid(self.path)
        root = self.root
        info = dict(root.attrs["wsi_unet"])
        info.update(tiles_segmented=int((states == TILE_DONE).sum()), tiles_skipped=int((states == TILE_SKIPPED).sum()))
        info["status"] = "complete"
        root.attrs["wsi_unet"] = info

    @property
    def status(self) -> str | None:
        return (read_provenance(Path(self.path)) or {}).get("status")


def read_tile_states(store_path: str | Path) -> np.ndarray:
    """``tiles/state`` as a (rows, cols) array, read straight from its one-byte chunk files.

    The state array has one chunk per tile (so each tile has one writer). Through zarr each chunk costs
    ~0.9 ms (its async machinery per chunk): 49 s for the 57,600 tiles of a 4-gigapixel slide, read at
    plan and at finalize. Here: one directory scan and a read per stored chunk (absent = pending, the
    fill value), decoded the way the array's metadata says (bytes, optionally zstd); other codecs fall
    back to zarr."""
    array = zarr.open_array(f"{store_path}/tiles/state", mode="r")
    codecs = _state_chunk_codecs(array)
    if codecs is None:
        return array[...]
    decode = _zstd_decode if codecs[-1] == "ZstdCodec" else bytes
    states = np.full(array.shape, array.fill_value, dtype=np.uint8)
    chunks = Path(store_path, "tiles", "state", "c")
    if not chunks.is_dir():
        return states
    with os.scandir(chunks) as rows:
        for row in rows:
            if not row.name.isdigit():
                continue
            with os.scandir(row.path) as cols:
                for col in cols:
                    if col.name.isdigit():  # not a zarr temp file
                        with open(col.path, "rb") as handle:
                            states[int(row.name), int(col.name)] = decode(handle.read())[0]
    return states


def _state_chunk_codecs(array: zarr.Array) -> list[str] | None:
    """The state array's codec names if its chunk files can be read and written directly (bytes, optionally
    zstd; keys ``c/<row>/<col>``), else None."""
    codecs = [type(codec).__name__ for codec in array.metadata.codecs]
    encoding = array.metadata.chunk_key_encoding
    if codecs not in (["BytesCodec"], ["BytesCodec", "ZstdCodec"]) or getattr(encoding, "separator", None) != "/":
        return None
    return codecs


def _write_states(array: zarr.Array, store_path: Path, states: np.ndarray) -> None:
    """Fill a new, empty ``tiles/state`` with ``states`` (pending = fill value, so only other states are stored).

    Only for a store being built (one writer, nothing reads it yet). Through zarr each one-byte chunk costs
    ~2 ms: 292 s for the 136,668 background tiles of a 15-gigapixel slide. Here zarr encodes one chunk of each
    value, and the other chunks of that value get a copy of its file (bound by file creation: ~0.3 ms each on
    this project's VM disk, 2026-11-21)."""
    if _state_chunk_codecs(array) is None:
        array[...] = states
        return
    chunks = f"{store_path}/tiles/state/c"
    for row in np.flatnonzero((states != array.fill_value).any(axis=1)).tolist():
        os.makedirs(f"{chunks}/{row}", exist_ok=True)
    for value in np.unique(states[states != array.fill_value]):
        rows, cols = np.nonzero(states == value)
        array[rows[0], cols[0]] = value  # zarr writes the first: its file is every other one's content
        encoded = Path(chunks, str(rows[0]), str(cols[0])).read_bytes()
        for row, col in zip(rows[1:].tolist(), cols[1:].tolist()):
            handle = os.open(f"{chunks}/{row}/{col}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(handle, encoded)
            finally:
                os.close(handle)


def _zstd_decode(data: bytes) -> bytes:
    from numcodecs import Zstd

    return Zstd().decode(data)


def sync_region(store_path: str, array: zarr.Array, box: tuple[int, int, int, int]) -> None:
    """fsync the chunk files (and their folders) that cover ``box`` = (y0, x0, y1, x1) of ``array``.

    zarr writes each chunk by temp file + rename but never fsyncs, so without this a power loss after a
    tile is marked done could lose its pixels. Chunks equal to the fill value are not stored: nothing to sync.
    """
    y0, x0, y1, x1 = box
    cy, cx = array.chunks[-2:]
    folders = set()
    lead = (0,) * (array.ndim - 2)  # class axis of probabilities: one chunk spans all classes
    for i in range(y0 // cy, -(-y1 // cy)):
        for j in range(x0 // cx, -(-x1 // cx)):
            chunk_file = Path(store_path, array.path, array.metadata.encode_chunk_key((*lead, i, j)))
            try:
                fd = os.open(chunk_file, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            folders.add(chunk_file.parent)
    for folder in folders:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pyramid_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """Level shapes, halving until the whole level fits in one chunk."""
    shapes = [tuple(shape)]
    while max(shapes[-1]) > chunk:
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    return shapes


def open_existing_store(
    path: str | Path, grid: TileGrid, provenance: dict[str, Any], *, overwrite: bool = False, resume: bool = False
) -> OutputStore | None:
    """The existing store at ``path`` to resume, or None when a new one is to be created.

    Refuses (:class:`OutputExistsError`) an existing output unless ``resume`` and it was made with the
    same settings, or ``overwrite`` (then None: the caller creates a new one that replaces it).
    """
    path = Path(path)
    remove_stale_siblings(path)
    if not path.exists():
        return None
    if overwrite:
        return None
    existing = read_provenance(path)
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
    skipped: list[Tile] = (),
) -> OutputStore:
    """Create the store once, in the driver, atomically: built beside ``path`` and renamed into place.

    An existing store at ``path`` is replaced only after the new one is complete on disk (callers
    decide whether that is allowed, see :func:`open_existing_store`). ``tissue_mask`` (low resolution)
    is kept under ``tissue/mask``; ``skipped`` tiles are recorded as such in ``tiles/state``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    building = path.with_name(f"{path.name}.creating-{os.getpid()}")
    try:
        _build_store(building, grid, chunk, class_names, mpp, provenance, probabilities, tissue_mask, skipped)
        if path.exists():  # overwrite: move the old one aside first, so a crash never leaves neither
            retired = path.with_name(f"{path.name}.replaced-{os.getpid()}")
            os.replace(path, retired)
            os.replace(building, path)
            _remove(retired)
        else:
            os.replace(building, path)
    except BaseException:
        _remove(building)
        raise
    return OutputStore(str(path), grid)


def _build_store(
    path: Path, grid: TileGrid, chunk: int, class_names: list[str], mpp: float | None, provenance: dict[str, Any],
    probabilities: bool, tissue_mask: np.ndarray | None, skipped: list[Tile],
) -> None:  # fmt: skip
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
    if tissue_mask is not None:
        group = root.create_group("tissue")
        group.create_array("mask", data=tissue_mask.astype(np.uint8), chunks=tissue_mask.shape, dimension_names=["y", "x"])
        group.attrs["scale"] = float(tissue_mask.shape[0] / grid.shape[0])  # mask pixels per segmented-level pixel
    states = np.zeros((grid.rows, grid.cols), dtype=np.uint8)
    for tile in skipped:
        states[tile.row, tile.col] = TILE_SKIPPED
    tiles = root.create_group("tiles")
    state = tiles.create_array("state", shape=(grid.rows, grid.cols), chunks=(1, 1), dtype="uint8", fill_value=0)
    _write_states(state, path, states)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def remove_stale_siblings(path: Path) -> None:
    """Remove what a killed creation left beside ``path`` (the caller holds the store's lock, so they are stale)."""
    for sibling in path.parent.glob(f"{glob.escape(path.name)}.*-*"):
        if sibling.name.rsplit("-", 1)[0] in (f"{path.name}.creating", f"{path.name}.replaced"):
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


def _multiscales(name: str, axes: list[str], levels: int, mpp: float | None) -> dict[str, Any]:
    unit = {"unit": "micrometer"} if mpp else {}
    axis_meta = [{"name": a, "type": "channel"} if a == "c" else {"name": a, "type": "space", **unit} for a in axes]
    base = mpp or 1.0
    datasets = []
    for level in range(levels):
        scale = [1.0 if a == "c" else base * 2**level for a in axes]
        datasets.append({"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]})
    return {"name": name, "axes": axis_meta, "datasets": datasets}


def read_provenance(path: Path) -> dict[str, Any] | None:
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs["wsi_unet"])
    except Exception:
        return None


RESUME_KEYS = (
    "source", "level", "shape", "mpp", "tile_size", "chunk", "halo", "model_checksum", "probabilities", "tissue",
    "pixels",
)  # fmt: skip


def _check_resumable(path: Path, existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    changed = [k for k in RESUME_KEYS if existing.get(k) != wanted.get(k)]
    if "pixels" in changed and "pixels" not in existing:  # made before reads were native (2026-12)
        if existing.get("level", 0) == 0 or float(existing.get("level0_downsample") or 1).is_integer():
            changed.remove("pixels")  # level 0 and whole-number downsamples were read exactly then too
        else:
            raise OutputExistsError(
                f"{path}: cannot resume, an earlier version wrote it reading level {existing.get('level')} with a "
                "sub-pixel shift per tile (seams); use overwrite=True (--overwrite) to segment it again"
            )
    if changed:
        raise OutputExistsError(
            f"{path}: cannot resume, the existing store was made with other settings ({', '.join(changed)}); "
            "use overwrite=True (--overwrite) to start again"
        )


def build_pyramid(path: str | Path, chunks_per_block: int = 16) -> None:
    """Fill levels 1..k of the label pyramid by 2x nearest-neighbour (``level[::2, ::2]``) from the level below.

    Works in blocks of one chunk row by ``chunks_per_block`` chunks of the target level (so memory is a few
    MiB at any slide size, and each target chunk is written once, by one writer); zarr fetches and encodes
    the chunks of a block concurrently. (Dask's graph for the same copy took 4x as long: 11 s vs 2.9 s for a
    12288^2 store, 2026-11-21.)
    """
    group = zarr.open_group(f"{path}/{LABELS_PATH}", mode="r+")
    level = 1
    while str(level) in group:
        source, target = group[str(level - 1)], group[str(level)]
        (height, width), (ch, cw) = target.shape, target.chunks
        for y0 in range(0, height, ch):
            for x0 in range(0, width, cw * chunks_per_block):
                y1, x1 = min(y0 + ch, height), min(x0 + cw * chunks_per_block, width)
                target[y0:y1, x0:x1] = source[2 * y0 : 2 * y1 : 2, 2 * x0 : 2 * x1 : 2]
        level += 1


def open_labels(path: str | Path, level: int = 0) -> zarr.Array:
    return zarr.open_array(f"{path}/{LABELS_PATH}/{level}", mode="r")
