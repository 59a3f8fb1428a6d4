"""(h) CPU modes: the forward pass in each precision and layout, against this CPU's measured peak, with its exactness.

For each mode (float32 or bf16 autocast; NCHW or channels_last; eager, or bf16 channels_last through the job's
``--compile``: torch.compile with frozen weights, batches padded to 4) and torch thread count (1, and every core):

* forward Mpx/s: :class:`pipeline.inference.predict.TilePredictor` on real input windows (tile 256, batch 4)
  cut from ``cmu-1-small-region.svs``, cycled, in this process;
* GFLOP/s: Mpx/s x the model's FLOPs per output pixel (counted by ``torch.utils.flop_counter``);
* fraction of peak: GFLOP/s / the same threads' measured peak, oneDNN's best compute-bound 3 x 3
  convolution (:func:`conv_peak`) in the mode's precision. Measured rather than units x lanes x clock: this
  VM does not name its CPU generation or clock;
* agreement: the share of pixels whose argmax equals float32 NCHW's, on every tissue tile of cmu-1 and of the
  synthetic slide's middle 2048^2 px (benchmarks.slides), and the top-2 logit gap of the pixels that differ;
* tiled vs whole: the mode's tiled logits of a 1024^2 region of cmu-1 against one whole pass over it in the
  same mode (:func:`pipeline.inference.predict.whole_image_logits`): the largest |difference| and argmax agreement.

A second table times reads of 348^2 windows: native, and resampled by 2 (a 2 x 2 mean) and by 1.98 (the
separable filter), each against the native read of the same base area.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import timed_rate

COLUMNS = ["precision", "layout", "threads", "forward Mpx/s", "GFLOP/s", "peak GFLOP/s (3x3 conv)", "of peak",
           "× float32 NCHW", "argmax = float32 (cmu-1)", "argmax = float32 (synthetic)", "differing px: median top-2 gap",
           "tiled vs whole: max |Δ logit|", "tiled vs whole: argmax agreement"]  # fmt: skip
READ_COLUMNS = ["read", "ms per 348² window", "output Mpx/s", "× native read of the same base area"]
MODES = [("float32", False, False, 1), ("float32", True, False, 1), ("bfloat16", False, False, 1),
         ("bfloat16", True, False, 1), ("bfloat16", True, True, 1), ("float32", True, False, 2), ("bfloat16", True, False, 2),
         ("bfloat16", True, True, 2)]  # (precision, channels_last, compile, tiles per side of a forward window)


def conv_peak(dtype: torch.dtype, threads: int, seconds: float = 2.0) -> float:
    """GFLOP/s of oneDNN's best case here: the faster of two compute-bound 3 x 3 convolutions (256 channels
    over 8 x 32^2 px, 128 over 4 x 64^2; channels_last) in ``dtype`` with ``threads`` torch threads. Not
    ``torch.mm``: on this AMD CPU it goes through MKL, which skips AVX-512 there (96 GFLOP/s float32 on one
    thread); nor a 1 x 1 convolution, which is memory-bound (85)."""
    torch.set_num_threads(threads)
    best = 0.0
    for channels, side, batch in ((256, 32, 8), (128, 64, 4)):
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).eval()
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(batch, channels, side, side).contiguous(memory_format=torch.channels_last)

        def step() -> int:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                conv(x)
            return 1

        rate = timed_rate(step, seconds)["mpx_per_s"] * 1e6  # convolutions per second
        best = max(best, rate * 2 * channels * channels * 9 * batch * side**2 / 1e9)
    return best


def tissue_windows(path: Path, model, grid_side: int | None = None, limit: int = 48,
                   forward_tiles: int = 1) -> tuple[Any, np.ndarray]:  # fmt: skip
    """Input windows of up to ``limit`` tissue tiles (tile 256) of ``path`` (its middle ``grid_side``^2 px): one per
    tile, or (``forward_tiles`` > 1) one per block of that many tiles a side that the job would run as one window."""
    from dataclasses import replace

    from pipeline.inference.tile_batches import read_windows
    from pipeline.slides.geometry import forward_windows, tile_grid_for_model
    from pipeline.slides.pyramid import open_slide
    from pipeline.slides.sources import ArraySource
    from pipeline.slides.tissue_tiles import slide_tissue_mask, tissue_tiles

    slide = open_slide(path)
    if grid_side:
        y, x = (slide.size[0] - grid_side) // 2, (slide.size[1] - grid_side) // 2
        slide = ArraySource(slide.read(max(0, y), max(0, y) + grid_side, max(0, x), max(0, x) + grid_side))
    grid = tile_grid_for_model(model, slide.size, 256)
    run = tissue_tiles(grid, slide_tissue_mask(slide, True))  # the job's own tissue detection
    if forward_tiles > 1:
        whole = replace(grid, shard_tiles=max(grid.rows, grid.cols))
        blocks = [w for w in forward_windows(whole, whole.shard(0, 0, run), forward_tiles) if len(w.tiles) > 1]
        return grid, np.stack([slide.read_window(w.y - grid.halo, w.x - grid.halo, w.side + grid.reach)
                               for w in blocks[: max(1, limit // forward_tiles**2)]])  # fmt: skip
    tiles = [tile for tile in grid if run[tile.row, tile.col]][:limit]
    return grid, read_windows(slide, grid, tiles)


def mode_predictor(model, grid, amp: str | None, channels_last: bool, compile: bool = False, forward_tiles: int = 1):
    from pipeline.inference.predict import TilePredictor

    return TilePredictor.for_grid(model, grid, device="cpu", amp=amp, channels_last=channels_last, compile=compile,
                                  batch_size=4, forward_tiles=forward_tiles)  # fmt: skip


def per_batch(windows: np.ndarray, grid) -> int:
    """Windows per forward pass: the job's batch of 4 tiles' pixels (one window of 2 x 2 tiles)."""
    from pipeline.inference.predict import windows_per_batch

    return windows_per_batch(4, grid.tile_size, windows.shape[1] - grid.reach)


def predictions(predictor, windows: np.ndarray, batch: int = 4) -> np.ndarray:
    """Logits of ``windows`` through ``predictor``, ``batch`` at a time."""
    return np.concatenate([predictor(windows[i : i + batch], return_logits=True)["logits"]
                           for i in range(0, len(windows), batch)])  # fmt: skip


def agreement(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float | None]:
    """Share of pixels with the reference's argmax, and the median top-2 gap (reference) where they differ."""
    differ = reference.argmax(1) != logits.argmax(1)
    top2 = np.sort(reference, axis=1)[:, -2:]
    gaps = (top2[:, 1] - top2[:, 0])[differ]
    return 1 - differ.mean(), float(np.median(gaps)) if gaps.size else None


def tiled_vs_whole(model, region: np.ndarray, predictor, amp: str | None) -> tuple[float, float]:
    """``predictor``'s tiles of ``region`` against one whole pass over it in the same precision ``amp``."""
    from pipeline.inference.predict import whole_image_logits
    from pipeline.inference.tile_batches import tiled_region_logits
    from pipeline.slides.geometry import tile_grid_for_model
    from pipeline.slides.sources import ArraySource

    grid = tile_grid_for_model(model, region.shape[:2], 256)
    tiled = tiled_region_logits(ArraySource(region), grid, predictor)
    whole = whole_image_logits(model, region, amp=amp)
    return float(np.abs(tiled - whole).max()), float((tiled.argmax(0) == whole.argmax(0)).mean())


def read_rows(slide_path: Path) -> list[list[Any]]:
    from pipeline.slides.pyramid import open_slide
    from pipeline.slides.sources import ResampledSource

    base = open_slide(slide_path)
    rows = []
    for label, factor in (("native", 1.0), ("resampled by 2 (2 x 2 mean)", 2.0), ("resampled by 1.98 (separable)", 1.98)):
        view = base if factor == 1.0 else ResampledSource(base, factor)
        origins = [(y, x) for y in range(-46, view.size[0] - 348, 251) for x in range(-46, view.size[1] - 348, 251)]
        side = round(348 * factor)
        for y, x in origins[:2]:  # warm the decoded-tile cache alike for both reads
            view.read_window(y, x, 348), base.read_window(round(y * factor), round(x * factor), side)
        started = time.perf_counter()
        for y, x in origins:
            view.read_window(y, x, 348)
        per_window = (time.perf_counter() - started) / len(origins)
        started = time.perf_counter()
        for y, x in origins:
            base.read_window(round(y * factor), round(x * factor), side)
        native = (time.perf_counter() - started) / len(origins)
        rows.append([label, 1e3 * per_window, 256**2 / 1e6 / per_window, per_window / native])
    return rows


def run(model, demo_slide: Path, cmu_slide: Path, *, seconds: float) -> dict[str, Any]:
    from benchmarks.gpu import flops_per_tile

    saved = torch.get_num_threads()
    flops_per_px = {k: flops_per_tile(model, model.valid_output_size(256 * k)) / (256 * k) ** 2
                    for k in (1, 2)}  # per kept px: the model computes 260^2 (516^2) for 256^2 (512^2) kept
    windows = {k: (tissue_windows(cmu_slide, model, forward_tiles=k)[1],
                   tissue_windows(demo_slide, model, grid_side=2048, forward_tiles=k)[1]) for k in (1, 2)}  # fmt: skip
    grid, _ = tissue_windows(cmu_slide, model, limit=1)
    from pipeline.slides.pyramid import open_slide

    region = open_slide(cmu_slide).read(800, 1824, 600, 1624)
    rows, records = [], []
    try:
        torch.set_num_threads(1)
        float32 = mode_predictor(model, grid, None, False)  # every grid here has the same tile geometry
        # float32 NCHW on the same windows: on blocks it equals the tiles' float32 within 1e-4 (tests/test_exactness.py)
        reference = {k: [predictions(float32, w, per_batch(w, grid)) for w in pair] for k, pair in windows.items()}
        base_rate: dict[int, float] = {}
        for threads in sorted({1, os.cpu_count() or 1}):
            peaks = {name: conv_peak(dtype, threads) for name, dtype in
                     (("float32", torch.float32), ("bfloat16", torch.bfloat16))}  # fmt: skip
            for precision, channels_last, compile, k in MODES:
                amp = "bf16" if precision == "bfloat16" else None
                torch.set_num_threads(threads)
                predictor = mode_predictor(model, grid, amp, channels_last, compile, forward_tiles=k)
                cmu, demo = windows[k]
                size = per_batch(cmu, grid)
                batches = [cmu[i : i + size] for i in range(0, len(cmu) - size + 1, size)]
                state = {"i": 0}

                def step() -> int:
                    state["i"] += 1
                    return predictor(batches[state["i"] % len(batches)])["labels"].size

                rate = timed_rate(step, seconds)["mpx_per_s"]
                base_rate.setdefault(threads, rate)
                gflops = rate * flops_per_px[k] / 1e3
                torch.set_num_threads(1)
                cmu_agree, gap = agreement(reference[k][0], predictions(predictor, cmu, size))
                demo_agree, _ = agreement(reference[k][1], predictions(predictor, demo, size))
                worst, whole_agree = tiled_vs_whole(model, region, predictor, amp) if threads == 1 else (None, None)
                record = {"precision": precision, "channels_last": channels_last, "compile": compile, "threads": threads,
                          "forward_tiles": k,
                          "mpx_per_s": rate, "gflops": gflops, "peak_gflops": peaks[precision],
                          "agreement_cmu": cmu_agree, "agreement_demo": demo_agree, "median_gap": gap,
                          "tiled_vs_whole_max": worst, "tiled_vs_whole_agreement": whole_agree}  # fmt: skip
                records.append(record)
                layout = ("channels_last" if channels_last else "NCHW") + (", torch.compile" if compile else "") + \
                    (f", {k} x {k} tiles per window" if k > 1 else "")  # fmt: skip
                rows.append([precision, layout, threads, rate, gflops,
                             peaks[precision], gflops / peaks[precision], rate / base_rate[threads],
                             f"{100 * cmu_agree:.3f} %", f"{100 * demo_agree:.3f} %", gap if gap is not None else "–", worst if worst is not None else "(1 thread)",
                             whole_agree if whole_agree is not None else "(1 thread)"])  # fmt: skip
    finally:
        torch.set_num_threads(saved)
    return {
        "columns": COLUMNS, "rows": rows, "records": records, "flops_per_output_px": flops_per_px[1],
        "flops_per_output_px_2x2": flops_per_px[2],
        "reads": {"columns": READ_COLUMNS, "rows": read_rows(cmu_slide)},
        "notes": [
            f"model: {flops_per_px[1] / 1e6:.4f} MFLOP per kept output pixel at tile 256 (the model computes "
            f"{model.valid_output_size(256)}^2 and the job keeps 256^2), {flops_per_px[2] / 1e6:.4f} in windows of "
            f"2 x 2 tiles ({model.valid_output_size(512)}^2 for 512^2); {len(windows[1][0])} tissue tiles of cmu-1 "
            f"({len(windows[2][0])} blocks of 2 x 2), {len(windows[1][1])} ({len(windows[2][1])}) of the synthetic "
            "slide's middle 2048^2; tiled vs whole on cmu-1[800:1824, 600:1624], in the mode's windows.",
        ],
    }  # fmt: skip
