"""(e) GPU: the paper's U-Net (3 input channels, 64 base channels, depth 4, valid padding) in bf16.

* model FLOPs per output pixel, counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta
  device (no memory, no compute: runs anywhere; 2 FLOPs per multiply-add, convolutions only);
* per output tile size (572 -> 388 up to ~2k) and batch size: output Mpx/s of TilePredictor's fused step
  (uint8 on the GPU -> float, normalise, channels_last, bf16 autocast, forward, argmax, crop, uint8) on
  device-resident windows, achieved TFLOP/s and the fraction of ``--peak-tflops``;
* at one tile/batch: the effect of channels_last, torch.compile (default mode) and CUDA graphs
  (torch.compile mode "reduce-overhead", static shapes);
* end to end through segment_batch with the Ray path (GPU actor, reads on all the machine's CPUs) on a
  multi-gigapixel synthetic slide, and its efficiency against the bare TilePredictor call.

Without CUDA only the FLOP count runs, and the section says it was skipped and why.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import load_watch

SWEEP_COLUMNS = ["tile (in -> out)", "batch", "GFLOP per tile", "MFLOP per output px", "Mpx/s", "TFLOP/s",
                 "fraction of peak"]  # fmt: skip
FLOP_COLUMNS = ["tile (in -> out)", "GFLOP per tile", "MFLOP per output px"]
VARIANT_COLUMNS = ["variant", "Mpx/s", "TFLOP/s", "fraction of peak"]
E2E_COLUMNS = ["slide", "tiles", "end-to-end s", "end-to-end Mpx/s", "bare TilePredictor Mpx/s", "efficiency",
               "end-to-end ÷ model (CUDA graphs)", "peak PSS MiB"]  # fmt: skip


def paper_unet():
    from unet import UNet

    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=2, base_channels=64, depth=4, padding="valid").eval()


def flops_per_tile(model, output_size: int) -> int:
    """Model FLOPs of one tile with ``output_size`` valid output pixels a side (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    size = model.input_size_for(output_size)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        meta(torch.empty(1, model.config.in_channels, size, size, device="meta"))
    return int(counter.get_total_flops())


def flop_table(model, tiles: list[int]) -> list[list[Any]]:
    rows = []
    for tile in tiles:
        out = model.valid_output_size(tile)
        flops = flops_per_tile(model, out)
        rows.append([f"{model.input_size_for(out)} -> {out}", flops / 1e9, flops / out**2 / 1e6])
    return rows


def model_rate(model, tile: int, batch: int, seconds: float, *, channels_last: bool = True,
               compile: bool | str = False, device: str = "cuda") -> float:  # fmt: skip
    """Output Mpx/s of TilePredictor's fused step on device-resident uint8 windows (no host transfers)."""
    from benchmarks.common import timed_rate
    from pipeline.inference.predict import TilePredictor

    out = model.valid_output_size(tile)
    size = model.input_size_for(out)
    predictor = TilePredictor(copy.deepcopy(model), tile_size=out, crop=0, device=device, amp="bf16",
                              compile=compile, batch_size=batch, channels_last=channels_last)  # fmt: skip
    windows = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device)
    synchronize = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)

    def step() -> int:
        predictor._forward(windows)  # noqa: SLF001 - the fused step without the host copies of __call__
        synchronize()
        return batch * out**2

    with torch.inference_mode():
        return timed_rate(step, seconds, warmup=3)["mpx_per_s"]


def sweep(model, tiles: list[int], batches: list[int], seconds: float, peak: float,
          device: str = "cuda") -> list[list[Any]]:  # fmt: skip
    rows = []
    for tile in tiles:
        out = model.valid_output_size(tile)
        flops = flops_per_tile(model, out)
        for batch in batches:
            try:
                mpx = model_rate(model, tile, batch, seconds, device=device)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append([f"{model.input_size_for(out)} -> {out}", batch, flops / 1e9, flops / out**2 / 1e6,
                             "out of memory", None, None])  # fmt: skip
                continue
            tflops = mpx * 1e6 * flops / out**2 / 1e12
            rows.append([f"{model.input_size_for(out)} -> {out}", batch, flops / 1e9, flops / out**2 / 1e6, mpx,
                         tflops, tflops / peak])  # fmt: skip
    return rows


def variants(model, tile: int, batch: int, seconds: float, peak: float) -> list[list[Any]]:
    out = model.valid_output_size(tile)
    per_px = flops_per_tile(model, out) / out**2
    rows = []
    for label, options in [
        ("eager, NCHW", dict(channels_last=False)),
        ("eager, channels_last", dict(channels_last=True)),
        ("torch.compile (default mode), channels_last", dict(compile="default")),
        ("torch.compile mode=reduce-overhead (CUDA graphs), channels_last", dict(compile="reduce-overhead")),
    ]:
        try:
            mpx = model_rate(model, tile, batch, seconds, **options)
        except Exception as error:  # a compiler or driver problem must not lose the other figures
            rows.append([label, f"failed: {type(error).__name__}: {str(error)[:120]}", None, None])
            continue
        rows.append([label, mpx, mpx * 1e6 * per_px / 1e12, mpx * 1e6 * per_px / 1e12 / peak])
    return rows


def end_to_end(model, workdir: Path, slide_gpx: float, mosaic_base: int, tile: int, batch: int, seconds: float,
               compile: bool) -> dict[str, Any]:  # fmt: skip
    from benchmarks.efficiency import measure
    from benchmarks.slides import slide_of_size
    from pipeline.inference.ray_runner import RayOptions

    slide = slide_of_size(workdir, slide_gpx, mosaic_base)
    cpus = os.cpu_count() or 1
    options = RayOptions(actors=1, gpus_per_actor=1.0, cpus_per_actor=1.0, batch_size=batch, amp="bf16",
                         compile=compile, progress=False)  # fmt: skip
    record = measure(slide, model, workdir, label="gpu", options=options, num_cpus=cpus, tile_size=tile,
                     forward_seconds=seconds, previews=True)  # fmt: skip
    record["slide"] = str(slide)
    return record


def run(workdir: Path, *, tiles: list[int], batches: list[int], peak_tflops: float, slide_gpx: float,
        mosaic_base: int, quick: bool, e2e_tile: int = 1024, e2e_batch: int = 4) -> dict[str, Any]:  # fmt: skip
    model = paper_unet()
    flops = flop_table(model, tiles)
    notes = [f"FLOPs: torch.utils.flop_counter on the meta device, paper U-Net (3 -> 64 base -> depth 4, valid); "
             f"peak {peak_tflops:g} TFLOP/s dense bf16 (--peak-tflops)."]  # fmt: skip
    if not torch.cuda.is_available():
        reason = (f"torch.cuda.is_available() is False (torch {torch.__version__}, no CUDA device on this machine); "
                  "only the FLOP count ran. On a GPU node: python benchmarks/run.py --sections gpu --peak-tflops 790")
        return {"skipped": reason, "columns": FLOP_COLUMNS, "rows": flops, "notes": notes}
    seconds = 2.0 if quick else 5.0
    record: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0)}
    with load_watch(record):
        record["sweep"] = sweep(model, tiles, batches, seconds, peak_tflops)
        record["variants"] = variants(model, e2e_tile, e2e_batch, seconds, peak_tflops)
        record["end_to_end"] = end_to_end(model, workdir, slide_gpx, mosaic_base, e2e_tile, e2e_batch, seconds,
                                          compile=True)  # fmt: skip
    e2e = record["end_to_end"]
    pipeline = e2e["pipeline"]
    graphs = record["variants"][-1][1]
    e2e_rows = [[Path(e2e["slide"]).name, pipeline["tiles_run"], pipeline["wall_s"], pipeline["mpx_per_s"],
                 e2e["bare_mpx_per_s"], e2e["efficiency"],
                 pipeline["mpx_per_s"] / graphs if isinstance(graphs, float) else None,
                 pipeline["memory"]["peak_pss_mib"]]]  # fmt: skip
    notes.append(f"Variants and end to end at tile {e2e_tile}, batch {e2e_batch}, bf16. End to end: segment_batch, "
                 f"1 GPU actor with CUDA graphs, reads and writes on the other {os.cpu_count() - 1} CPUs, no tissue "
                 "mask; bare = TilePredictor call on pre-read host windows (copies included); model = the fused "
                 "step on device-resident windows (the CUDA-graph variant).")  # fmt: skip
    tables = [
        ("variants", VARIANT_COLUMNS, record["variants"]),
        ("end to end", E2E_COLUMNS, e2e_rows),
        ("FLOPs", FLOP_COLUMNS, flops),
    ]
    return {"columns": SWEEP_COLUMNS, "rows": record["sweep"], "tables": tables, "records": record, "notes": notes}
