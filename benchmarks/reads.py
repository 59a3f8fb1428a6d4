"""(f) Slide reads: input windows per second at level 0 and at a level above 0, before and after native reads.

Each reader cuts every overlap-tile input window of a level (tile 256, window 256 + 2 x halo of the model,
in the grid order the job reads them) from a synthetic JPEG-tiled pyramidal TIFF whose side is odd, so that
its level 1 has a non-integer downsample (as real scanners' levels do). Each reader runs in a fresh process
(cold tile caches; the file itself is in the page cache for all). Readers:

* ``openslide region (before)``: what the pipeline did before: OpenSlide ``read_region`` at the level-0
  origin ``round(x * downsample)``, composited on white; at a non-integer level it is not exact.
* ``native, N decode threads``: :mod:`pipeline.slides.tiff_reader`, the level's own tiles, a process-wide cache
  of decoded tiles, the tiles a window needs decoded in N threads.
* ``native, Dask shard blocks (the job)``: what the job reads since shards: each shard's input block, read once
  through its culled Dask graph (:class:`pipeline.slides.shard_blocks.ShardBlocks`, default decode threads),
  windows cut from it 4 at a time; every shard that holds one of the section's windows is read whole and all its windows
  are counted.
* ``tifffile via zarr``: tifffile's own ``aszarr`` store read through zarr, for reference.

"exact" says whether every window equals the same window of the level's raster, read whole by tifffile.
(Not OpenSlide's whole-level read: OpenSlide paints a large region in parts of 4096 px, each from its own
level-0 origin, so beyond 4096 px its own whole read of a non-integer level is shifted too.)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import load_watch, run_isolated

COLUMNS = ["level", "downsample", "reader", "windows", "ms per window", "windows/s", "output Mpx/s",
           "× before", "exact", "load (1 min)"]  # fmt: skip
READERS = ("openslide region (before)", "native, 1 decode thread (after, default)", "native, 2 decode threads",
           "native, Dask shard blocks (the job)", "tifffile via zarr")  # fmt: skip


def odd_slide(workdir: Path, side: int) -> Path:
    """A rendered (side - 1)^2 slide: level 1 is side / 2 px, so its downsample is (side - 1) / (side / 2) < 2."""
    from pipeline.demo.synthetic import make_demo_slide

    path = Path(workdir) / f"odd-{side - 1}.tiff"
    if not path.exists():
        make_demo_slide(path, height=side - 1, width=side - 1, seed=2, tile=256, tissue=0.315)
    return path


def windows(shape: tuple[int, int], tile: int, halo: int, limit: int) -> list[tuple[int, int, int]]:
    size = tile + 2 * halo
    origins = [(y - halo, x - halo, size) for y in range(0, shape[0], tile) for x in range(0, shape[1], tile)]
    return origins[:limit]


def read_all(reader: str, path: str, level: int, origins: list[tuple[int, int, int]]) -> dict[str, Any]:
    """In a fresh process: time reading every window; check each against one whole-level read."""
    if "decode thread" in reader:
        os.environ["WSI_DECODE_THREADS"] = reader.split(", ")[1].split()[0]
    import openslide
    import tifffile

    from pipeline.slides.sources import ArraySource, SlideSource, composite_on_white, read_window

    handle = openslide.OpenSlide(path)
    downsample = handle.level_downsamples[level]
    width, height = handle.level_dimensions[level]
    if reader.startswith("openslide"):
        def region(y0, y1, x0, x1):
            rgba = handle.read_region((round(x0 * downsample), round(y0 * downsample)), level, (x1 - x0, y1 - y0))
            return composite_on_white(np.asarray(rgba))

        class Before(SlideSource):  # the old reader: OpenSlide regions, mirrored by the same read_window
            shape = (height, width, 3)

            def _read(self, y0, y1, x0, x1):
                return region(y0, y1, x0, x1)

        source = Before()
    elif reader.startswith("native"):
        from pipeline.slides.pyramid import open_slide

        source = open_slide(path, level)
    else:
        import zarr

        source = ArraySource(zarr.open_array(tifffile.imread(path, aszarr=True, level=level), mode="r"))
    if "shard blocks" in reader:  # imported once per process by the job's workers; not a cost per read
        import dask.array.optimization  # noqa: F401
        import dask.local  # noqa: F401
    started = time.perf_counter()
    if "shard blocks" in reader:
        origins, cut = shard_block_windows(source, origins)
    else:
        cut = [read_window(source, y, x, size) for y, x, size in origins]
    seconds = time.perf_counter() - started
    whole = tifffile.imread(path, level=level)
    exact = all((w == read_window(whole, y, x, size)).all() for w, (y, x, size) in zip(cut, origins))
    return {"seconds": seconds, "windows": len(origins), "exact": exact}


def shard_block_windows(source: Any, origins: list[tuple[int, int, int]]) -> tuple[list, list[np.ndarray]]:
    """Every window of the shards (16 x 16 tiles) that hold ``origins``' windows, cut from one block read each."""
    from pipeline.inference.tile_batches import cut_windows
    from pipeline.slides.geometry import make_tile_grid
    from pipeline.slides.shard_blocks import ShardBlocks

    halo, size = -origins[0][0], origins[0][2]
    grid = make_tile_grid(source.size, size - 2 * halo, halo=halo, alignment=1, input_size=size, shard_tiles=16)
    blocks = ShardBlocks(source, grid)
    wanted = {(y + halo, x + halo) for y, x, _ in origins}
    shards = [shard for shard in grid.shards() if any((t.y, t.x) in wanted for t in shard.tiles)]
    cut, read = [], []
    for shard in shards:
        block = blocks.read(shard)
        for start in range(0, len(shard.tiles), 4):  # cut a batch at a time, as the job does
            cut.extend(cut_windows(*block, grid, shard.tiles[start : start + 4]))
        read.extend((*grid.input_origin(tile), size) for tile in shard.tiles)
    return read, cut


def run(workdir: Path, *, side: int, tile_size: int, halo: int, limit: int) -> dict[str, Any]:
    import openslide

    path = odd_slide(workdir, side)
    Path(path).read_bytes()  # into the page cache, for every reader alike
    handle = openslide.OpenSlide(str(path))
    rows, records = [], []
    for level in (0, 1):
        shape = handle.level_dimensions[level][::-1]
        origins = windows(shape, tile_size, halo, limit)
        before = None
        for reader in READERS:
            record: dict[str, Any] = {"level": level, "reader": reader}
            with load_watch(record):
                result, _ = run_isolated(read_all, reader, str(path), level, origins)
            record.update(result)
            records.append(record)
            per_window = result["seconds"] / result["windows"]
            before = before or per_window
            rows.append([level, f"{handle.level_downsamples[level]:.5f}", reader, result["windows"], 1e3 * per_window,
                         1 / per_window, tile_size**2 / 1e6 / per_window, before / per_window,
                         "yes" if result["exact"] else "no", f"{record['load_before'][0]} -> {record['load_after'][0]}"])  # fmt: skip
    return {
        "columns": COLUMNS, "rows": rows, "records": records, "slide": str(path),
        "notes": [
            f"{Path(path).name}: JPEG tiles of 256 px; windows of {tile_size + 2 * halo} px (tile {tile_size} + 2 x "
            f"halo {halo}) in grid order, the first {limit} of each level; output Mpx/s counts the {tile_size}^2 px "
            "each window yields.",
        ],
    }  # fmt: skip
