"""The demo run: a synthetic H&E-like slide, segmented with the bundled model, scored against its truth.

``python jobs/segment_slides.py`` with no arguments runs this, so a new user sees the whole path
(generator -> tissue detection -> Ray actors -> OME-Zarr -> preview) and a number that says it worked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import tifffile
import zarr

from pipeline.inference.batch import BatchConfig, BatchRun, segment_batch
from pipeline.inference.ray_runner import RayOptions
from pipeline.store.output_store import open_labels
from pipeline.demo.synthetic import make_demo_slide

logger = logging.getLogger(__name__)

DEMO_SIZE = 6144  # segments in about a minute on 2 CPU cores with the bundled model


@dataclass
class DemoRun:
    batch: BatchRun
    dice: float | None
    slide: Path


def dice_against_mask(store: str | Path, mask_path: str | Path) -> float:
    """Dice of the object (every class but background 0: a nucleus's interior and its boundary rim) against a 0/1
    ground-truth mask TIFF, chunk by chunk (bounded memory)."""
    labels = open_labels(store)
    truth = da.from_zarr(zarr.open_array(tifffile.imread(mask_path, aszarr=True), mode="r"))
    predicted = da.from_zarr(labels).rechunk(truth.chunksize) > 0
    truth = truth > 0
    if predicted.shape != truth.shape:
        raise ValueError(f"{store}: shape {predicted.shape} differs from the mask {mask_path} {truth.shape}")
    both, total = da.compute((predicted & truth).sum(), predicted.sum() + truth.sum())
    return float(2 * both / total) if total else 1.0


def run_demo(workdir: str | Path, model, options: RayOptions | None = None, size: int = DEMO_SIZE, num_cpus=None) -> DemoRun:
    """Generate (once) the demo slide under ``workdir`` and segment it into ``workdir/results``."""
    workdir = Path(workdir)
    slide = workdir / f"demo-slide-{size}.tiff"
    mask = slide.with_name(slide.stem + "-mask.tiff")
    if not (slide.exists() and mask.exists()):
        logger.info("generating the demo slide %s (%dx%d px)", slide, size, size)
        make_demo_slide(slide, height=size, width=size, mpp=model.card.mpp or 0.5, seed=0)
    out = workdir / "results"
    config = BatchConfig(overwrite=True)  # the demo's own folder: each demo run replaces the last one
    batch = segment_batch([str(slide)], out, model, config, options, num_cpus=num_cpus)
    dice = None
    if not batch.failed:
        dice = dice_against_mask(batch.results[0].output, mask)
    return DemoRun(batch, dice, slide)
