"""(b) Peer comparison: MONAI's sliding_window_inference vs our overlap-tile engine, same model, same image.

The image is a ``size`` x ``size`` region of the benchmark slide, held in memory (MONAI needs the whole
image as one tensor, and so does the reference). Each method runs in a fresh process with the same torch
thread count; its peak memory is that process's.

* reference: one forward pass over the whole image mirror-padded by the halo
  (:func:`pipeline.whole_image_logits`);
* ours: :func:`pipeline.segment_slide` (tiles of ``tile_size``, input = tile + 2 x halo, valid centres written
  to a Zarr store), the executor the Ray actors run piece by piece;
* MONAI with overlap 0.25 / constant blending (its defaults) and 0.5 / gaussian blending. Our valid-padding
  U-Net shrinks its input by the halo on every side, while sliding_window_inference wants a predictor
  whose output has the ROI's size, so the predictor mirror-pads each ROI by the halo (numpy "symmetric",
  as our tiling does at the slide border) and runs the U-Net on it. The ROI is the model's valid output
  size nearest above ``tile_size``, so each MONAI forward pass costs the same as one of our tiles; what
  differs is the number of passes (overlap) and the context at the ROI borders (mirrored, not real).

Distance from the reference: the fraction of pixels whose argmax differs and the largest |Δ probability|
(softmax). Ours uses the labels of the written store and, for probabilities, :func:`pipeline.tiled_logits`
(same geometry and TilePredictor as the job).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import MIB, load_watch, run_isolated

COLUMNS = ["method", "seconds", "Mpx/s", "ours ÷ this (speed)", "forward passes", "peak PSS MiB", "added MiB",
           "argmax differs (fraction)", "max |Δ probability|", "load (1 min)"]  # fmt: skip


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=0, keepdims=True)


def symmetric_pad(x, pad: int):
    """(N, C, H, W) tensor padded by ``pad`` on each side like np.pad(mode="symmetric") (edge repeated)."""
    import torch

    from pipeline.slides.geometry import symmetric_index

    rows = torch.from_numpy(symmetric_index(np.arange(-pad, x.shape[-2] + pad), x.shape[-2])).to(x.device)
    cols = torch.from_numpy(symmetric_index(np.arange(-pad, x.shape[-1] + pad), x.shape[-1])).to(x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


class MirrorPaddedUNet:
    """ROI (N, C, r, r) in [0, 1] -> logits (N, K, r, r): mirror-pad by the halo, valid U-Net forward."""

    def __init__(self, model) -> None:
        self.model, self.halo, self.calls = model, model.halo, 0

    def __call__(self, roi):
        self.calls += roi.shape[0]
        return self.model(symmetric_pad(roi, self.halo))


def roi_size(model, tile_size: int) -> int:
    """The ROI side for MONAI: a valid output size, so ROI + 2 x halo is a valid input (as our tiles)."""
    return model.valid_output_size(tile_size) if model.is_valid_padding else tile_size


# --------------------------------------------------------------------------- one method, in a fresh process
def prepare() -> None:
    """Imports every method needs, before the baseline memory sample."""
    import monai.inferers  # noqa: F401
    import zarr  # noqa: F401

    import pipeline.inference.engine  # noqa: F401
    import unet  # noqa: F401


def _setup(model_path: str, threads: int):
    import torch

    from unet import load_model

    torch.set_num_threads(threads)
    return load_model(model_path).eval()


def run_reference(image: np.ndarray, model_path: str, threads: int, amp: str | None = None) -> dict[str, Any]:
    from pipeline.inference.predict import whole_image_logits

    model = _setup(model_path, threads)
    started = time.perf_counter()
    logits = whole_image_logits(model, image, amp=amp)
    return {"seconds": time.perf_counter() - started, "probabilities": _softmax(logits), "passes": 1}


def run_ours(image: np.ndarray, model_path: str, threads: int, tile_size: int, batch_size: int,
             amp: str | None = None) -> dict[str, Any]:  # fmt: skip
    import zarr

    from pipeline.inference.engine import segment_slide

    model = _setup(model_path, threads)
    with tempfile.TemporaryDirectory(prefix="peer-ours-") as tmp:
        result = segment_slide(image, Path(tmp) / "ours.zarr", model, tile_size=tile_size, batch_size=batch_size,
                               amp=amp)  # fmt: skip
        labels = zarr.open_array(f"{result.output}/labels/segmentation/0", mode="r")[...]
    return {"seconds": result.seconds, "labels": labels, "passes": result.tiles_run}


def run_ours_logits(image: np.ndarray, model_path: str, threads: int, tile_size: int, batch_size: int,
                    amp: str | None = None) -> dict:  # fmt: skip
    from pipeline.inference.engine import tiled_logits

    model = _setup(model_path, threads)
    return {"probabilities": _softmax(tiled_logits(image, model, tile_size, batch_size=batch_size, amp=amp))}


def run_monai(image: np.ndarray, model_path: str, threads: int, tile_size: int, batch_size: int, overlap: float,
              mode: str, amp: str | None = None) -> dict[str, Any]:  # fmt: skip
    import torch
    from monai.inferers import sliding_window_inference

    from pipeline.inference.predict import resolve_amp

    model = _setup(model_path, threads)
    predictor = MirrorPaddedUNet(model)
    size = roi_size(model, tile_size)
    started = time.perf_counter()
    dtype = resolve_amp(amp, torch.device("cpu"))
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div_(255.0)  # the whole image as one tensor
        logits = sliding_window_inference(x, (size, size), batch_size, predictor, overlap=overlap, mode=mode)
        logits = logits[0].float().numpy()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "probabilities": _softmax(logits), "passes": predictor.calls}


# --------------------------------------------------------------------------- the section
def distance(reference: np.ndarray, probabilities: np.ndarray | None = None, labels: np.ndarray | None = None):
    """(fraction of pixels whose argmax differs from the reference's, max |Δ probability| or None)."""
    expected = reference.argmax(axis=0)
    if labels is None:
        labels = probabilities.argmax(axis=0)
    differs = float(np.mean(labels != expected))
    delta = float(np.abs(probabilities - reference).max()) if probabilities is not None else None
    return differs, delta


def region(slide_path: Path, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` of the slide (tissue and glass), as an in-memory uint8 image."""
    from pipeline.slides.pyramid import open_slide

    slide = open_slide(slide_path)
    height, width = slide.size
    y0, x0 = max(0, (height - size) // 2), max(0, (width - size) // 2)
    return np.ascontiguousarray(slide.read(y0, min(height, y0 + size), x0, min(width, x0 + size)))


def run(slide_path: Path, model_path: Path, workdir: Path, *, size: int, tile_size: int, batch_size: int,
        threads: int | None = None, amp: str | None = "auto") -> dict[str, Any]:  # fmt: skip
    """Every method against one float32 pass over the whole image; ours and MONAI in ``amp`` (the job's
    default precision), ours also in float32 (the exact mode), and the whole pass in ``amp`` too."""
    import os

    import torch

    from pipeline.inference.predict import resolve_amp

    try:
        import monai  # noqa: F401
    except ImportError:
        return {"skipped": 'MONAI is not installed: pip install -e ".[bench]"', "rows": []}
    threads = threads or os.cpu_count() or 1
    image = region(slide_path, size)
    mpx = image.shape[0] * image.shape[1] / 1e6
    model = str(model_path)
    dtype = resolve_amp(amp, torch.device("cpu"))
    name = str(dtype).removeprefix("torch.") if dtype else "float32"
    ours = ("ours: overlap-tile (segment_slide)", run_ours, (image, model, threads, tile_size, batch_size))
    methods = [
        ("whole image (reference), float32", run_reference, (image, model, threads)),
        (f"{ours[0]}, float32 (exact)", ours[1], ours[2]),
    ]  # fmt: skip
    if dtype is not None:
        methods += [(f"whole image, {name}", run_reference, (image, model, threads, amp)),
                    (f"{ours[0]}, {name} (the job's default)", ours[1], (*ours[2], amp))]  # fmt: skip
    methods += [
        (f"MONAI overlap 0.25, constant, {name}", run_monai, (image, model, threads, tile_size, batch_size, 0.25,
                                                             "constant", amp)),
        (f"MONAI overlap 0.5, gaussian, {name}", run_monai, (image, model, threads, tile_size, batch_size, 0.5,
                                                            "gaussian", amp)),
    ]  # fmt: skip
    records: dict[str, dict[str, Any]] = {}
    for label, function, arguments in methods:
        record: dict[str, Any] = {}
        with load_watch(record):
            out, memory = run_isolated(function, *arguments, prepare=prepare)
        record.update(out, memory=memory.as_dict(), added_mib=round((memory.peak_pss - memory.baseline_pss) / MIB, 1))
        records[label] = record
    reference = records[methods[0][0]].pop("probabilities")
    ours_labels = {label: args[-1] if len(args) == 6 else None for label, f, args in methods if f is run_ours}
    ours_label = list(ours_labels)[-1]  # the job's default precision: the speed every row is compared with
    rows = []
    for label, record in records.items():
        if label in ours_labels:
            probabilities = run_ours_logits(image, model, threads, tile_size, batch_size, ours_labels[label])
            differs, _ = distance(reference, labels=record.pop("labels"))
            _, delta = distance(reference, probabilities["probabilities"])
        elif label != methods[0][0]:
            differs, delta = distance(reference, record.pop("probabilities"))
        else:
            differs, delta = 0.0, 0.0
        record.update(mpx_per_s=mpx / record["seconds"], argmax_differs=differs, max_abs_dprob=delta)
    ours_speed = records[ours_label]["mpx_per_s"]
    for label, record in records.items():
        rows.append([label, record["seconds"], record["mpx_per_s"], ours_speed / record["mpx_per_s"],
                     record["passes"], record["memory"]["peak_pss_mib"], record["added_mib"],
                     record["argmax_differs"], record["max_abs_dprob"],
                     f"{record['load_before'][0]} -> {record['load_after'][0]}"])  # fmt: skip
    return {
        "columns": COLUMNS, "rows": rows, "records": records, "image": list(image.shape), "threads": threads,
        "roi": roi_size(_setup(model, threads), tile_size),
        "notes": [
            f"{image.shape[1]}x{image.shape[0]} px region of {slide_path.name}, in memory; torch threads {threads}; "
            f"batch {batch_size}; forward passes = tiles (ours) or ROIs (MONAI). Peak PSS: the method's fresh process "
            "(torch and the model loaded); added: above that process's memory before the method started. "
            "MONAI wraps the valid U-Net by mirror-padding each ROI by the halo (see benchmarks/peer.py).",
        ],
    }  # fmt: skip
