"""Result stores built directly (no model, no Ray) for the downstream-analysis tests.

``planted_mask`` is a class-index mosaic over many 16-px chunks whose awkward cases are placed on purpose:
objects across chunk corners, pairs that touch only diagonally across a corner, objects on the slide
border and in the partial last chunks, a ring with a hole across chunk borders, and one object snaking
through dozens of chunks; random blobs of two classes fill the rest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr
from scipy import ndimage

from pipeline.slides.geometry import TileGrid
from pipeline.store.output_store import LABELS_PATH, create_output_store

CHUNK = 16
CLASSES = ["background", "nucleus", "stroma"]
SHAPE = (37 * CHUNK - 5, 53 * CHUNK - 7)  # 37 x 53 chunks, the last row and column partial


def planted_mask(shape: tuple[int, int] = SHAPE, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.56] = 1
    mask[(ndimage.gaussian_filter(rng.random(shape), 2.5) > 0.54) & (mask == 0)] = 2
    c = CHUNK
    mask[: 6 * c, : 6 * c] = 0  # a clear area for the planted cases
    mask[c - 1 : c + 1, c - 1 : c + 1] = 1  # 2x2 square on the corner of four chunks
    mask[2 * c - 1, 2 * c - 1] = mask[2 * c, 2 * c] = 1  # diagonal contact across a corner
    mask[3 * c - 1, 3 * c] = mask[3 * c, 3 * c - 1] = 2  # anti-diagonal contact across a corner
    mask[4 * c - 3 : 4 * c + 3, 4 * c - 3 : 4 * c + 3] = 1  # ring with a hole, across a corner
    mask[4 * c - 1 : 4 * c + 1, 4 * c - 1 : 4 * c + 1] = 0
    mask[0, 0] = mask[0, 5 * c] = 2  # on the slide border
    mask[5 * c - 2 : 5 * c + 2, 0:3] = 1  # left border, across a chunk border
    snake = np.zeros(shape, dtype=bool)  # one object through many chunks, clear of the random blobs
    snake[6 * c + 3, 20 : shape[1] - 20] = True
    snake[6 * c + 3 : shape[0] - 3, shape[1] - 21] = True
    around = ndimage.binary_dilation(snake, iterations=2)
    mask[around] = 0
    mask[snake] = 1
    mask[-2:, -3:] = 2  # bottom-right corner, in the partial last chunk
    return mask


def make_store(
    path: str | Path, mask: np.ndarray, *, mpp: float | None = 0.5, chunk: int = CHUNK,
    class_names: list[str] = CLASSES, tissue_mask: np.ndarray | None = None, **provenance,
) -> Path:  # fmt: skip
    """A complete store holding ``mask`` at level 0, as the pipeline writes it (pyramid, status, provenance).

    Tiles are 8 x 8 chunks (the pipeline allows any whole multiple), one tile per shard.
    """
    tile = 8 * chunk
    grid = TileGrid(tuple(mask.shape), tile, 0, 1, tile, 0)
    info = {"source": str(path) + ".missing-slide", "level": 0, "shape": list(mask.shape), "mpp": mpp,
            "level0_downsample": 1.0, "class_names": class_names, **provenance}  # fmt: skip
    store = create_output_store(
        path, grid, chunk=chunk, class_names=class_names, mpp=mpp, provenance=info, tissue_mask=tissue_mask
    )
    store.labels()[...] = mask
    zarr.open_array(f"{path}/shards/done", mode="r+")[...] = 1
    mark_complete(path, mask)
    return Path(path)


def mark_complete(path: str | Path, mask: np.ndarray) -> None:
    """What ``OutputStore.finalize`` does (2x nearest-neighbour pyramid, then status "complete"), by whole-array
    writes: its chunk-by-chunk dask pass takes seconds on thousands of 16-px chunks."""
    group = zarr.open_group(f"{path}/{LABELS_PATH}", mode="r+")
    level = 1
    while str(level) in group:
        group[str(level)][...] = mask[:: 2**level, :: 2**level]
        level += 1
    root = zarr.open_group(str(path), mode="r+")
    root.attrs["wsi_unet"] = {**dict(root.attrs["wsi_unet"]), "status": "complete"}


def reference_objects(mask: np.ndarray, cls: int, connectivity: int) -> np.ndarray:
    """Sorted object areas of class ``cls`` from scipy.ndimage.label on the whole array."""
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)
    labels, count = ndimage.label(mask == cls, structure=structure)
    return np.sort(np.bincount(labels.ravel(), minlength=count + 1)[1:])
