"""(d) Tissue skipping: the job's wall time with and without the tissue mask on a ~30 % tissue slide.

Both runs are :func:`pipeline.inference.batch.segment_batch` with the default Ray layout on an already started local
Ray (as in section (a)); with the mask, tiles without tissue are neither read nor run (detection on a
thumbnail from the slide's pyramid is included in the time). The unmasked run is section (a)'s "default"
row when that ran in the same invocation on the same slide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import load_watch

COLUMNS = ["tissue mask", "tiles run", "tiles skipped", "wall s", "output Mpx/s (tiles run)", "slide Mpx/s",
           "speed-up", "load (1 min)"]  # fmt: skip


def run(slide: Path, model, workdir: Path, *, tile_size: int, batch_size: int, actors: int,
        reuse: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    import ray

    from benchmarks.efficiency import pipeline_run, start_ray
    from pipeline.inference.ray_runner import RayOptions
    from pipeline.slides.pyramid import open_slide

    options = RayOptions(actors=actors, batch_size=batch_size, progress=False)
    height, width = open_slide(slide).size
    runs: dict[str, dict[str, Any]] = {}
    previous = [r for r in (reuse or {}).get("records", []) if r["config"] == "default" and r["options"] == _asdict(options)]
    try:
        start_ray(None)
        for mask in (True, False):
            if not mask and previous:
                runs["off"] = {**previous[0]["pipeline"], "load_before": previous[0]["load_before"],
                               "load_after": previous[0]["load_after"], "from": "section (a), default row"}  # fmt: skip
                continue
            record: dict[str, Any] = {}
            with load_watch(record):
                record.update(pipeline_run(slide, model, workdir / "tissue", options, tile_size,
                                           tissue_mask=True if mask else None))  # fmt: skip
            runs["on" if mask else "off"] = record
    finally:
        ray.shutdown()
    rows = []
    for name in ("off", "on"):
        r = runs[name]
        rows.append([name, r["tiles_run"], r["tiles_skipped"], r["wall_s"], r["mpx_per_s"],
                     height * width / 1e6 / r["wall_s"], runs["off"]["wall_s"] / r["wall_s"],
                     f"{r['load_before'][0]} -> {r['load_after'][0]}"])  # fmt: skip
    total = runs["on"]["tiles_run"] + runs["on"]["tiles_skipped"]
    return {
        "columns": COLUMNS, "rows": rows, "records": runs, "slide": str(slide),
        "notes": [
            f"{width}x{height} px synthetic slide, {runs['on']['tiles_run']} of {total} tiles hold tissue "
            f"({runs['on']['tiles_run'] / total:.0%}); slide Mpx/s counts the whole slide's pixels.",
        ],
    }  # fmt: skip


def _asdict(options) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(options)
