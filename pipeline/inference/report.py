"""Batch bookkeeping for the command line: which inputs are slides, results for slides that never ran,
the per-slide summary table and the JSON run report (``<out>/run-report.json``)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.store.durability import atomic_file, durable_mkdir
from pipeline.inference.engine import SegmentResult
from pipeline.slides.inputs import InputKind, expand_inputs
from pipeline.text import text_table

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".zarr")
REPORT_NAME = "run-report.json"


def is_slide_path(path: Path) -> bool:
    return path.suffix.lower() in SLIDE_EXTENSIONS


SLIDES = InputKind(
    is_item=is_slide_path, plural="slides", missing="no such slide file or directory",
    folder_hint=f" ({', '.join(SLIDE_EXTENSIONS)})",
)  # fmt: skip


def expand_slide_inputs(
    inputs: Iterable[str], exclude: str | Path | None = None
) -> tuple[list[Path], list[tuple[str, str]]]:
    """Slide files, directories (their slide files, not recursive) and globs as slide paths.

    ``*.zarr`` directories are slides, not folders to search. Anything under ``exclude`` (the output
    folder) is left out. Returns (slides in order without duplicates, [(input, reason)] for inputs that
    name no slide).
    """
    return expand_inputs(inputs, SLIDES, exclude)


def safe_stem(slide: str | Path) -> str:
    """A slide's file stem as a portable output name: ASCII letters, digits, ``-``, ``_`` and inner dots.

    Accents are transliterated (é -> e), anything else (spaces, ``/``, ``..``, other scripts) becomes ``_``,
    so an output name can never leave the output folder or trip up a shell, a URL or another filesystem.
    """
    import unicodedata

    stem = Path(str(slide).rstrip("/\\")).stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", ascii_stem).strip("._")
    if not cleaned.strip("_"):  # nothing readable left (e.g. a name in another script): keep it unique
        cleaned = "slide-" + hashlib.sha256(stem.encode()).hexdigest()[:10]
    return cleaned[:200]


def output_path_for(slide: str | Path, out_dir: str | Path) -> Path:
    """``<out_dir>/<safe slide stem>.zarr`` (see :func:`safe_stem`); always directly inside ``out_dir``."""
    return Path(out_dir) / f"{safe_stem(slide)}.zarr"


def failed_result(slide: str | Path, output: str | Path, reason: str, level: int = 0) -> SegmentResult:
    """The result of a slide that could not start (bad path, unopenable, output exists, ...)."""
    return SegmentResult(
        slide=str(slide), output=str(output), shape=(0, 0), level=level, mpp=None, tiles_total=0, tiles_run=0,
        tiles_skipped=0, seconds=0.0, error=" ".join(str(reason).split()),
    )  # fmt: skip


def format_table(results: Sequence[SegmentResult]) -> str:
    """Plain-text table, one row per slide: slide, size (w x h), level, tiles run/skipped, s, Mpx/s, output, status."""
    header = ("slide", "size", "level", "tiles run/skipped", "resumed", "seconds", "Mpx/s", "output", "status")
    rows = []
    for r in results:
        size = f"{r.shape[1]}x{r.shape[0]}" if r.shape[0] else "-"
        rows.append((
            Path(r.slide).name, size, str(r.level), f"{r.tiles_run}/{r.tiles_skipped}", _resumed(r),
            f"{r.seconds:.1f}", f"{r.megapixels_per_second:.2f}", r.output, r.status,
        ))  # fmt: skip
    return text_table(header, rows)


def _resumed(result: SegmentResult) -> str:
    """What an earlier run had done: "-" (nothing), "kept" (it was complete) or "N earlier" (tiles resumed)."""
    if result.kept:
        return "kept"
    return f"{result.tiles_done_earlier} earlier" if result.resumed else "-"


def build_run_report(
    results: Sequence[SegmentResult], settings: dict[str, Any], started: float, finished: float
) -> dict[str, Any]:
    complete = sum(r.ok for r in results)
    return {
        "report": "wsi-unet segment_slides run",
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
        "summary": {
            "slides": len(results), "complete": complete, "failed": len(results) - complete,
            "resumed": [r.slide for r in results if r.resumed and not r.kept],
            "kept": [r.slide for r in results if r.kept],
            "failures": [{"slide": r.slide, "reason": r.error} for r in results if not r.ok],
        },  # fmt: skip
        "settings": settings,
        "slides": [r.to_dict() for r in results],
    }


def write_run_report(
    out_dir: str | Path, results: Sequence[SegmentResult], settings: dict[str, Any], started: float, finished: float
) -> Path:
    """Write ``<out_dir>/run-report.json`` atomically and durably and return its path.

    The temp file's name is this job's own (pid and a random part): two jobs writing reports into one folder
    never write into each other's temp file; the last to finish leaves its report."""
    path = durable_mkdir(out_dir) / REPORT_NAME
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(build_run_report(results, settings, started, finished), indent=2, default=str) + "\n")
    return path


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")
