"""Shared benchmark plumbing: process-tree memory sampling, isolated runs, timing, tables, machine facts.

Memory is measured over a whole process tree (the benchmark or job process and every descendant: Ray's
GCS, raylet, dashboard agents, workers and actors), never by process name, so other Ray instances on the
machine (someone's tests) are not counted. Two sums are kept: PSS (proportional set size, shared pages
split between the processes mapping them: the memory the job really holds) and RSS (shared pages counted
once per process: an upper bound; Ray's shared-memory object store inflates it).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import platform
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MIB = 2**20


# --------------------------------------------------------------------------- memory
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])  # after "(comm)": state, ppid
        except (OSError, ValueError, IndexError):  # ended meanwhile
            continue
        tree.setdefault(parent, []).append(int(name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants."""
    tree, found, stack = _children(), [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(tree.get(pid, []))
    return found


def _memory_of(pid: int) -> tuple[int, int]:
    """(PSS, RSS) bytes of one process; (0, 0) if it is gone."""
    try:
        pss = rss = 0
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
        return pss, rss
    except (OSError, ValueError):
        return 0, 0


def _name_of(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        text = cmd[0].decode(errors="ignore")
        return text if text.startswith("ray::") else Path(text).name
    except OSError:
        return "?"


@dataclass
class TreeMemory:
    """Peak summed PSS/RSS of a process tree, sampled every ``interval`` s on a thread (with ``with``)."""

    root: int | None = None
    interval: float = 0.25
    peak_pss: int = 0
    peak_rss: int = 0
    peak_processes: int = 0
    at_peak: dict[str, float] = field(default_factory=dict)  # MiB of PSS per process name at the PSS peak
    samples: int = 0
    baseline_pss: int = 0  # PSS when the measured work started (set by run_isolated)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        pids = process_tree(self.root or os.getpid())
        values = {pid: _memory_of(pid) for pid in pids}
        pss, rss = sum(v[0] for v in values.values()), sum(v[1] for v in values.values())
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_processes = max(self.peak_processes, len(pids))
        if pss > self.peak_pss:
            self.peak_pss = pss
            by_name: dict[str, float] = {}
            for pid, (p, _) in values.items():
                name = _name_of(pid)
                by_name[name] = by_name.get(name, 0.0) + p / MIB
            self.at_peak = {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])}

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def as_dict(self) -> dict[str, Any]:
        return {
            "peak_pss_mib": round(self.peak_pss / MIB, 1), "peak_rss_mib": round(self.peak_rss / MIB, 1),
            "processes": self.peak_processes, "samples": self.samples, "pss_at_peak_mib": self.at_peak,
        }  # fmt: skip


def run_isolated(function: Callable, *args: Any, prepare: Callable[[], Any] | None = None,
                 interval: float = 0.05) -> tuple[Any, TreeMemory]:  # fmt: skip
    """``function(*args)`` in a fresh spawned process (clean memory), with that process tree's peak memory.

    ``prepare()`` runs in that process first (imports, model load); ``baseline_pss`` is the memory after it."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pid = pool.submit(os.getpid).result()  # the worker is up before sampling starts
        if prepare is not None:
            pool.submit(prepare).result()
        memory = TreeMemory(pid, interval=interval)
        memory.sample()
        memory.baseline_pss = memory.peak_pss
        with memory:
            result = pool.submit(function, *args).result()
    return result, memory


# --------------------------------------------------------------------------- timing
def timed_rate(step: Callable[[], int], seconds: float, warmup: int = 1, min_steps: int = 3) -> dict[str, float]:
    """Run ``step`` (returns the output pixels it made) repeatedly for about ``seconds``: Mpx/s and steps."""
    for _ in range(warmup):
        step()
    pixels, steps, started = 0, 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - started < seconds:
        pixels += step()
        steps += 1
    elapsed = time.perf_counter() - started
    return {"mpx_per_s": pixels / 1e6 / elapsed, "seconds": elapsed, "steps": steps}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


@contextmanager
def load_watch(record: dict[str, Any]) -> Iterator[None]:
    """Record the 1-minute load average before and after a measurement (others share this machine)."""
    record["load_before"] = load_average()
    yield
    record["load_after"] = load_average()


# --------------------------------------------------------------------------- output
def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        magnitude = abs(value)
        return f"{value:.{digits}g}" if magnitude < 1e-2 or magnitude >= 1e5 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "-" if value is None else str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_section(title: str, section: dict[str, Any]) -> None:
    """A section is {"columns", "rows", "notes"...}: its title, table and notes, as Markdown."""
    print(f"\n### {title}\n")
    if section.get("skipped"):
        print(f"skipped: {section['skipped']}")
    if section.get("rows"):
        print(markdown_table(section["columns"], section["rows"]))
    for title, columns, rows in section.get("tables", []):
        print(f"\n{title}:\n")
        print(markdown_table(columns, rows))
    for note in section.get("notes", []):
        print(f"\n{note}")
    sys.stdout.flush()


def machine() -> dict[str, Any]:
    import torch

    info = {
        "date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "cpu": _cpu_model(), "memory_gib": round(_total_memory() / 2**30, 1),
        "cuda": torch.cuda.is_available(), "load_average": load_average(),
    }  # fmt: skip
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def write_json(results: dict[str, Any], path: Path | None) -> Path:
    if path is None:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str))
    return path
