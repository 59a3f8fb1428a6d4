"""Batch bookkeeping for the command line: which inputs are slides, results for slides that never ran,
the per-slide summary table and the run report (``<out>/run-reports/<UTC time>-<pid>.jsonl``: one JSON line
per slide as it finishes, the settings first and the summary last; each run writes its own file)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from pipeline.store.durability import durable_mkdir, fsync_path
from pipeline.inference.engine import SegmentResult
from pipeline.slides.inputs import InputKind, expand_inputs
from pipeline.text import text_table

SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".zarr")
REPORTS_FOLDER = "run-reports"


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


def name_slide(slide: str | Path, reason: str) -> str:
    """Every failure line names its file (some library errors name only the output or nothing)."""
    return reason if str(slide) in reason or Path(slide).name in reason else f"{slide}: {reason}"


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
            Path(r.slide).name, size, str(r.level), "-" if r.kept else f"{r.tiles_run}/{r.tiles_skipped}", _resumed(r),
            f"{r.seconds:.1f}", _rate(r), r.output, r.status,
        ))  # fmt: skip
    return text_table(header, rows)


def _rate(result: SegmentResult) -> str:
    """This run's Mpx/s, "kept" for an output left as it was, "-" for a failure."""
    if result.kept:
        return "kept"
    rate = result.megapixels_per_second
    return "-" if rate is None or not result.ok else f"{rate:.2f}"


def _resumed(result: SegmentResult) -> str:
    """What an earlier run had done: "-" (nothing), "kept" (it was complete) or "N earlier" (tiles resumed)."""
    if result.kept:
        return "kept"
    return f"{result.tiles_done_earlier} earlier" if result.resumed else "-"


def summarize(results: Sequence[SegmentResult]) -> dict[str, Any]:
    """The run's totals: slides, complete, failed, the resumed and kept slides, and each failure's reason."""
    complete = sum(r.ok for r in results)
    return {
        "slides": len(results), "complete": complete, "failed": len(results) - complete,
        "resumed": [r.slide for r in results if r.resumed and not r.kept],
        "kept": [r.slide for r in results if r.kept],
        "failures": [{"slide": r.slide, "reason": r.error} for r in results if not r.ok],
    }  # fmt: skip


class RunReport:
    """One run's report, written as the run goes: a JSON line per slide the moment it is final, never rewritten.

    ``<out>/run-reports/<UTC start>-<pid>.jsonl`` is created exclusively (an earlier run's report is never
    overwritten, even by a job started in the same second); its first line holds the settings, then one
    line per slide, and the last line the summary. Each line is flushed and fsync'ed, so after a crash the
    report holds every slide finished before it."""

    def __init__(self, out_dir: str | Path, settings: dict[str, Any], started: float) -> None:
        folder = durable_mkdir(Path(durable_mkdir(out_dir)) / REPORTS_FOLDER)
        stamp = _dt.datetime.fromtimestamp(started, _dt.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
        self.path, suffix = folder / f"{stamp}-{os.getpid()}.jsonl", 0
        while True:
            try:
                self._file = open(self.path, "x", encoding="utf-8")
                break
            except FileExistsError:
                suffix += 1
                self.path = folder / f"{stamp}-{os.getpid()}-{suffix}.jsonl"
        fsync_path(folder)
        self.started = started
        self._line({"report": "wsi-unet segment_slides run", "started": _iso(started), "settings": settings})

    def slide(self, result: SegmentResult) -> None:
        self._line({"slide": {**result.to_dict(), "finished": _dt.datetime.now(_dt.timezone.utc).isoformat()}})

    def finish(self, results: Sequence[SegmentResult], finished: float) -> Path:
        self._line({"finished": _iso(finished), "seconds": round(finished - self.started, 3),
                    "summary": summarize(results)})  # fmt: skip
        self._file.close()
        return self.path

    def close(self) -> None:
        self._file.close()

    def _line(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


def read_run_report(path: str | Path) -> dict[str, Any]:
    """A report as one dict (``settings``, ``slides``, ``summary``: None if the run never finished); ``path``
    is the report or an output folder (then its newest report)."""
    path = Path(path)
    if path.is_dir():
        reports = sorted((path / REPORTS_FOLDER).glob("*.jsonl"), key=lambda p: p.stat().st_mtime_ns)
        if not reports:
            raise FileNotFoundError(f"{path}: no run report in {path / REPORTS_FOLDER}")
        path = reports[-1]
    report: dict[str, Any] = {"path": str(path), "slides": [], "summary": None}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "slide" in record:
            report["slides"].append(record["slide"])
        else:
            report.update(record)
    return report


def _iso(timestamp: float) -> str:
    return _dt.datetime.fromtimestamp(timestamp, _dt.timezone.utc).isoformat(timespec="seconds")
