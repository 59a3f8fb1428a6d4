"""Benchmark inputs, made once and cached in the work folder: synthetic slides and small models.

Slides come from :func:`pipeline.demo.synthetic.make_demo_slide` (pyramidal JPEG TIFF, H&E-like) with about
30 % tissue (``TISSUE``). Rendering runs at ~1.5 Mpx/s on 2 cores, so a 16-gigapixel slide would take
hours; sizes above ``--mosaic-base`` are therefore made as a *mosaic*: the base slide's level-0 JPEG tiles
copied byte for byte k x k times (same tissue fraction, same tile content statistics, same file layout),
with the lower pyramid levels computed by the generator's own 2x-mean code. Reading, segmenting and
writing cost the same per tile as for a slide rendered pixel by pixel.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

TISSUE = 0.315  # make_demo_slide's tissue parameter giving ~30 % tissue pixels (lumens cut some out)
SEED = 1
TILE = 256


def slide_side(gigapixels: float, base: int | None = None) -> int:
    """Square side of a slide of about ``gigapixels``: a multiple of ``base`` (mosaics) or of 2048."""
    side = math.sqrt(gigapixels * 1e9)
    unit = base or 2048
    return max(unit, round(side / unit) * unit)


def synthetic_slide(workdir: Path, side: int) -> Path:
    """A rendered ``side`` x ``side`` slide with ~30 % tissue (cached by name)."""
    from pipeline.demo.synthetic import make_demo_slide

    path = Path(workdir) / f"synthetic-{side}-t{TISSUE}.tiff"
    if not path.exists():
        logger.info("rendering %s", path)
        make_demo_slide(path, height=side, width=side, seed=SEED, tile=TILE, tissue=TISSUE)
    return path


def mosaic_slide(workdir: Path, base_side: int, repeats: int) -> Path:
    """A (base_side * repeats)^2 slide whose level-0 tiles are copies of the rendered base slide's tiles."""
    import tifffile

    from pipeline.demo.synthetic import append_pyramid, jpeg_options
    from pipeline.store.durability import atomic_file

    if base_side % TILE:
        raise ValueError(f"mosaic base side {base_side} must be a multiple of the tile {TILE}")
    if repeats == 1:
        return synthetic_slide(workdir, base_side)
    side = base_side * repeats
    path = Path(workdir) / f"mosaic-{side}-of-{base_side}-t{TISSUE}.tiff"
    if path.exists():
        return path
    base = synthetic_slide(workdir, base_side)
    mpp = 0.5
    options = jpeg_options(mpp, TILE)
    options.pop("compressionargs")  # the tiles are written as they are, never re-encoded
    logger.info("writing the %dx%d mosaic %s", side, side, path)
    with atomic_file(path) as tmp:
        with tifffile.TiffFile(base) as tf, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
            # level L of the mosaic is the mosaic of the base's level L while the base's side there is a whole
            # number of tiles (the 2x mean never straddles two copies); append_pyramid computes the rest
            for level, page in enumerate(tf.pages):
                base_level = page.shape[0]
                if base_level % TILE or page.shape[0] != page.shape[1]:
                    break
                res = 1e4 / (mpp * 2**level)
                writer.write(_copied_tiles(tf, page, repeats), shape=(base_level * repeats, base_level * repeats, 3),
                             dtype=np.uint8, resolution=(res, res), subfiletype=1 if level else 0,
                             jpegtables=page.jpegtables, **options)  # fmt: skip
        append_pyramid(tmp, mpp, TILE)
    return path


def _copied_tiles(tf, page, repeats: int):
    """The encoded tiles of ``page`` (square, whole tiles) repeated ``repeats`` x ``repeats``, row-major."""
    per_row = page.shape[0] // TILE
    segments = []
    for offset, count in zip(page.dataoffsets, page.databytecounts):
        tf.filehandle.seek(offset)
        segments.append(tf.filehandle.read(count))
    for row in range(per_row * repeats):
        for col in range(per_row * repeats):
            yield segments[(row % per_row) * per_row + col % per_row]


def slide_of_size(workdir: Path, gigapixels: float, mosaic_base: int) -> Path:
    """About ``gigapixels``: rendered up to ``mosaic_base`` px a side, a mosaic of that base beyond."""
    side = slide_side(gigapixels)
    if side <= mosaic_base:
        return synthetic_slide(workdir, side)
    repeats = max(1, round(math.sqrt(gigapixels * 1e9) / mosaic_base))
    return mosaic_slide(workdir, mosaic_base, repeats)


def small_model(workdir: Path, base_channels: int = 4, depth: int = 3) -> Path:
    """A saved, Kaiming-initialised valid U-Net much cheaper than the bundled one (for memory runs)."""
    import torch

    from unet import UNet, load_model, save_model

    path = Path(workdir) / f"unet-b{base_channels}-d{depth}.pt"
    if not path.exists():
        default = load_model(Path(__file__).resolve().parents[1] / "models" / "nuclei-unet.pt")
        torch.manual_seed(0)
        model = UNet(base_channels=base_channels, depth=depth, input_mean=default.config.input_mean,
                     input_std=default.config.input_std)  # fmt: skip
        save_model(model, path, class_names=["background", "nucleus"], mpp=0.5)
    return path
