"""(e) GPU: the paper's U-Net (3 input channels, 64 base channels, depth 4, valid padding) in bf16.

* model FLOPs per output pixel, counted with ``torch.utils.flop_counter.FlopCounterMode`` on the meta
  device (no memory, no compute: runs anywhere; 2 FLOPs per multiply-add, convolutions only);
* per output tile size (572 -> 388 up to ~2k) and batch size: output Mpx/s of TilePredictor's fused step
  (uint8 on the GPU -> float, normalise, channels_last, bf16 autocast, forward, argmax, crop, uint8) on
  device-resident windows, achieved TFLOP/s and the fraction of ``--peak-tflops``;
* at one tile/batch: the effect of channels_last, torch.compile (default mode) and CUDA graphs
  (torch.compile mode "reduce-overhead", static shapes);
* end to end through the in-process engine (``segment_slide``: shards read ahead and written behind in
  threads on the host's cores) on a multi-gigapixel synthetic slide and on a real slide, against the fused
  step. The Ray job is not measured there: the GPU machine has no Ray (its wheel does not fit the carried files).

Without CUDA only the FLOP count runs, and the section says it was skipped and why.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import load_watch

SWEEP_COLUMNS = ["tile (in -> out)", "batch", "GFLOP per tile", "MFLOP per output px", "Mpx/s", "TFLOP/s",
                 "fraction of peak"]  # fmt: skip
FLOP_COLUMNS = ["tile (in -> out)", "GFLOP per tile", "MFLOP per output px"]
VARIANT_COLUMNS = ["variant", "Mpx/s", "TFLOP/s", "fraction of peak"]
E2E_COLUMNS = ["run", "gigapixels", "tiles run", "tiles skipped", "wall s", "end-to-end Mpx/s", "fused step Mpx/s",
               "end-to-end ÷ fused", "model busy", "peak PSS MiB"]  # fmt: skip


def paper_unet(base_channels: int = 64):
    from unet import UNet

    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=2, base_channels=base_channels, depth=4, padding="valid").eval()


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


def variants(model, tile: int, batch: int, seconds: float, peak: float, device: str = "cuda") -> list[list[Any]]:
    out = model.valid_output_size(tile)
    per_px = flops_per_tile(model, out) / out**2
    rows = []
    for label, options in [
        ("eager, NCHW", dict(channels_last=False)),
        ("eager, channels_last", dict(channels_last=True)),
        ("torch.compile (default mode), channels_last", dict(compile="default")),
        ("torch.compile mode=reduce-overhead (CUDA graphs), channels_last", dict(compile="reduce-overhead")),
    ]:
        if device == "cpu" and options.get("compile"):  # the dry run: CUDA graphs need CUDA, inductor minutes
            rows.append([label, "not in the dry run", None, None])
            continue
        try:
            mpx = model_rate(model, tile, batch, seconds, device=device, **options)
        except Exception as error:  # a compiler or driver problem must not lose the other figures
            rows.append([label, f"failed: {type(error).__name__}: {str(error)[:120]}", None, None])
            continue
        rows.append([label, mpx, mpx * 1e6 * per_px / 1e12, mpx * 1e6 * per_px / 1e12 / peak])
    return rows


def end_to_end(model, slide: Path, workdir: Path, tile: int, batch: int, fused_mpx: float | None, device: str,
               compile: bool | str = False) -> dict[str, Any]:  # fmt: skip
    """``segment_slide`` (the in-process engine: shards read ahead and written behind in threads, see
    ``pipeline.inference.engine.engine_threads``) on ``slide`` with tissue detection, bf16: wall seconds,
    output Mpx/s of the tiles run, and that ÷ the fused step's Mpx/s at the same tile and batch."""
    import shutil
    import time

    from benchmarks.common import TreeMemory
    from pipeline.inference.engine import segment_slide

    out = Path(workdir) / f"gpu-e2e-{Path(slide).stem}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    with TreeMemory() as memory:
        started = time.perf_counter()
        result = segment_slide(str(slide), out, model, tile_size=tile, batch_size=batch, device=device, amp="bf16",
                               tissue_mask=True, compile=compile)  # fmt: skip
        wall = time.perf_counter() - started
    if result.error:
        raise RuntimeError(f"end-to-end run failed: {result.error}")
    mpx = result.tiles_run * tile**2 / 1e6
    return {"slide": str(slide), "gigapixels": result.shape[0] * result.shape[1] / 1e9, "tiles_run": result.tiles_run,
            "tiles_skipped": result.tiles_skipped, "wall_s": wall, "mpx_per_s": mpx / wall,
            "model_busy": result.model_seconds / wall, "fused_mpx_per_s": fused_mpx,
            "vs_fused": mpx / wall / fused_mpx if fused_mpx else None, "peak_pss_mib": memory.as_dict()["peak_pss_mib"]}


def e2e_row(label: str, record: dict[str, Any]) -> list[Any]:
    return [label, f"{record['gigapixels']:.2f}", record["tiles_run"], record["tiles_skipped"], record["wall_s"],
            record["mpx_per_s"], record["fused_mpx_per_s"], record["vs_fused"], record["model_busy"],
            record["peak_pss_mib"]]  # fmt: skip


def run(workdir: Path, *, tiles: list[int], batches: list[int], peak_tflops: float, slide_gpx: float,
        mosaic_base: int, quick: bool, e2e_tile: int = 1024, e2e_batch: int = 4, real_slide: Path | None = None,
        bundled: Path | None = None, dry_run: bool = False) -> dict[str, Any]:  # fmt: skip
    """The GPU figures; ``dry_run`` runs every step on the CPU at toy sizes (to check the script, not to measure)."""
    from benchmarks.slides import slide_of_size
    from unet import load_model

    model = paper_unet() if not dry_run else paper_unet(base_channels=8)  # the dry run checks steps, not speed
    flops = flop_table(model, tiles)
    notes = [f"FLOPs: torch.utils.flop_counter on the meta device, paper U-Net (3 -> 64 base -> depth 4, valid); "
             f"peak {peak_tflops:g} TFLOP/s dense bf16 (--peak-tflops)."]  # fmt: skip
    if not torch.cuda.is_available() and not dry_run:
        reason = (f"torch.cuda.is_available() is False (torch {torch.__version__}, no CUDA device on this machine); "
                  "only the FLOP count ran. On a GPU machine: bash benchmarks/device_check.sh")
        return {"skipped": reason, "columns": FLOP_COLUMNS, "rows": flops, "notes": notes}
    device = "cpu" if dry_run else "cuda"
    seconds = 0.5 if dry_run else (2.0 if quick else 4.0)
    record: dict[str, Any] = {"gpu": "dry run on the CPU" if dry_run else torch.cuda.get_device_name(0)}
    small = load_model(bundled) if bundled else None
    with load_watch(record):
        record["sweep"] = sweep(model, tiles, batches, seconds, peak_tflops, device=device)
        if small is not None:
            record["sweep_bundled"] = sweep(small, tiles, batches, seconds, peak_tflops, device=device)
        record["variants"] = variants(model, e2e_tile, e2e_batch, seconds, peak_tflops, device=device)
        fused = model_rate(model, e2e_tile, e2e_batch, seconds, device=device)  # the step at the run's tile
        slide = slide_of_size(workdir, slide_gpx, mosaic_base)
        record["end_to_end"] = [("paper U-Net, synthetic", end_to_end(model, slide, workdir, e2e_tile, e2e_batch,
                                                                      fused, device))]  # fmt: skip
        if real_slide is not None and small is not None:
            tile = 256 if dry_run else 1024
            fused_small = model_rate(small, tile, e2e_batch, seconds, device=device)
            record["end_to_end"].append(("bundled model, " + Path(real_slide).name, end_to_end(
                small, real_slide, workdir, tile, e2e_batch, fused_small, device)))
    tables = [("variants", VARIANT_COLUMNS, record["variants"]),
              ("end to end (in-process engine)", E2E_COLUMNS, [e2e_row(label, r) for label, r in record["end_to_end"]]),
              ("FLOPs", FLOP_COLUMNS, flops)]  # fmt: skip
    if small is not None:
        tables.insert(0, ("bundled model sweep", SWEEP_COLUMNS, record["sweep_bundled"]))
    notes.append(f"Variants and the synthetic end to end at tile {e2e_tile}, batch {e2e_batch}, bf16. End to end: "
                 "segment_slide in this process (no Ray on the GPU machine), tissue detected, shards read ahead and "
                 "written behind in threads; 'fused' = the fused step's Mpx/s on device-resident windows at the same "
                 "tile and batch (eager, channels_last).")  # fmt: skip
    return {"columns": SWEEP_COLUMNS, "rows": record["sweep"], "tables": tables, "records": record, "notes": notes,
            "device": device}
