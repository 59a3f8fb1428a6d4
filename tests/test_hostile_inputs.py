"""Hostile or absurd inputs, and jobs that share a cluster's storage: each case fails alone, in one line, in
bounded memory, and never costs another slide or another job its output.

Slides: files whose header claims 470,000^2 or 10^6 x 10^6 px in a few hundred bytes, and a 1.4 MB TIFF whose one
zlib strip decodes to 1.2 GB. Stores and locks: two jobs taking over one stale lock at once, a job that lost its
lock, --overwrite of a store another slide made, look-alike sibling names, a kill between the two renames of an
overwrite, symlinked stores. The command line: the output folder given as input, a run report that cannot be
written, formula-like CSV cells. (Model files: tests/test_hostile_models.py.)
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import QUIET, random_image, run_job, shared_file, varied_unet
from pipeline.inference.report import read_run_report
from pipeline.inference.batch import BatchConfig, slide_items
from pipeline.inference.ray_runner import plan_remote
from pipeline.inference.engine import plan_slide, segment_slide
from pipeline.store.locking import StoreLock, StoreLockedError, StoreLockLostError, lock_path_for, read_lock_record
from pipeline.slides.sources import SlideError, SlideLimits
from pipeline.store.output_store import OutputExistsError, read_provenance, remove_stale_siblings

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "jobs" / "segment_slides.py"


# --------------------------------------------------------------------------- hostile TIFFs, built byte by byte
def tiff_bytes(width: int, height: int, *, data: bytes = b"", compression: int = 1,
               rows_per_strip: int | None = None, tile: int | None = None) -> bytes:  # fmt: skip
    """A little-endian RGB TIFF whose header says ``width`` x ``height``: one strip holding ``data``, or
    ``tile``-sized tiles that are all missing (offset 0). Nothing checks that the data fills the image."""
    entries: list[tuple[int, int, list[int]]] = [  # (tag, type: 3 SHORT / 4 LONG, values)
        (256, 4, [width]), (257, 4, [height]), (258, 3, [8, 8, 8]), (259, 3, [compression]), (262, 3, [2]),
        (277, 3, [3]), (284, 3, [1]),
    ]  # fmt: skip
    if tile:
        count = -(-width // tile) * -(-height // tile)
        entries += [(322, 4, [tile]), (323, 4, [tile]), (324, 4, [0] * count), (325, 4, [0] * count)]
    else:
        entries += [(273, 4, [0]), (278, 4, [rows_per_strip or height]), (279, 4, [len(data)])]
    entries.sort()
    ifd_size = 2 + 12 * len(entries) + 4
    extra, extra_at = bytearray(), 8 + ifd_size
    packed_entries = []
    for tag, kind, values in entries:
        fmt = "<" + ("H" if kind == 3 else "I") * len(values)
        payload = struct.pack(fmt, *values)
        if len(payload) <= 4:
            packed_entries.append(struct.pack("<HHI", tag, kind, len(values)) + payload.ljust(4, b"\0"))
        else:
            packed_entries.append(struct.pack("<HHII", tag, kind, len(values), extra_at + len(extra)))
            extra += payload
    data_at = extra_at + len(extra)
    ifd = struct.pack("<H", len(entries)) + b"".join(packed_entries) + struct.pack("<I", 0)
    if not tile:  # point StripOffsets at the data
        index = [tag for tag, _, _ in entries].index(273)
        start = 2 + 12 * index + 8
        ifd = ifd[:start] + struct.pack("<I", data_at) + ifd[start + 4 :]
    return b"II*\0" + struct.pack("<I", 8) + ifd + bytes(extra) + data


def zlib_zeros(size: int) -> bytes:
    compressor, block = zlib.compressobj(9), bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(size >> 20)] + [compressor.compress(bytes(size % (1 << 20)))]
    return b"".join(parts) + compressor.flush()


@pytest.fixture(scope="module")
def hostile_slides(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (file, the words its one-line refusal must hold)."""
    folder = tmp_path_factory.mktemp("hostile")
    cases = {
        "claims 470,000^2 px in one strip": (tiff_bytes(470_000, 470_000), "strips of 470000x470000 px"),
        "claims 470,000^2 px in tiles": (tiff_bytes(470_000, 470_000, tile=4096), "470000x470000 px (221 gigapixels)"),
        "claims 10^6 x 10^6 px": (tiff_bytes(1_000_000, 1_000_000, tile=8192), "1000000x1000000 px (1,000 gigapixels)"),
        "one 20,000^2 zlib strip": (tiff_bytes(20_000, 20_000, data=zlib_zeros(20_000 * 20_000 * 3), compression=8),
                                    "strips of 20000x20000 px (1,144 MiB each"),
    }  # fmt: skip
    slides = {}
    for index, (name, (content, words)) in enumerate(cases.items()):
        path = folder / f"hostile-{index}.tif"
        path.write_bytes(content)
        slides[name] = (path, words)
    return slides


def test_hostile_files_are_small(hostile_slides):
    sizes = {name: path.stat().st_size for name, (path, _) in hostile_slides.items()}
    assert sizes["claims 470,000^2 px in one strip"] < 200 and sizes["one 20,000^2 zlib strip"] < 1.5e6, sizes


PLAN_IN_BOUNDED_MEMORY = """
import resource, sys
sys.path.insert(0, {repo!r})
from pipeline.inference.engine import plan_slide
from unet import UNet, UNetConfig
model = UNet(UNetConfig(base_channels=4, depth=2))
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))  # after imports: ~0.7 GiB mapped by then
try:
    plan_slide(sys.argv[1], sys.argv[2], model, tile_size=256, tissue_mask=True)
except MemoryError:
    print("MemoryError"); sys.exit(3)
except Exception as error:
    print(type(error).__name__, error); sys.exit(1)
print("planned"); sys.exit(0)
"""


@pytest.mark.slow
def test_hostile_slides_are_refused_in_bounded_memory(hostile_slides, tmp_path):
    """Planned (open, size checks, thumbnail, tiles) in a process that may map at most 2 GiB in all."""
    script = PLAN_IN_BOUNDED_MEMORY.format(repo=str(REPO), limit=2 << 30)
    for name, (path, words) in hostile_slides.items():
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / f"{path.stem}.zarr")],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 1, (name, done.stdout, done.stderr[-2000:])
        assert done.stdout.startswith("SlideError") and words in done.stdout and str(path) in done.stdout, name
        assert time.perf_counter() - started < 60, name
        assert not (tmp_path / f"{path.stem}.zarr").exists()  # refused before any store


def test_tile_cap_refuses_before_any_tile_is_listed(tmp_path):
    with pytest.raises(SlideError, match=r"20 tiles at this level and tile size, more than the 9 allowed"):
        plan_slide(random_image(300, 200), tmp_path / "s.zarr", varied_unet(), tile_size=64, mpp=0.5,
                   limits=SlideLimits(max_tiles=9))  # fmt: skip
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.slow
def test_hostile_slides_fail_alone_through_the_job(hostile_slides, tmp_path):
    """One line each, exit 1, and the good slide of the same batch completes."""
    good = shared_file("slides/small-16px.svs")
    out = tmp_path / "out"
    done = run_cli(str(good), *(str(path) for path, _ in hostile_slides.values()), "--out", str(out),
                   "--level", "0", "--no-tissue-mask")  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR ")]
    for name, (path, words) in hostile_slides.items():
        mine = [line for line in errors if str(path) in line]
        assert len(mine) == 1 and words in mine[0], (name, mine)
    report = read_run_report(out)
    assert {Path(s["slide"]).name: s["status"] for s in report["slides"]}["small-16px.svs"] == "complete"


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_job(*args, *QUIET, timeout=timeout)


# --------------------------------------------------------------------------- locks
def write_stale_lock(store: Path) -> dict:
    """A lock left by a job on this host whose process is gone."""
    record = {"host": os.uname().nodename, "pid": 2**22 + 12345, "start": "1", "since": 0.0, "token": "dead"}
    lock_path_for(store).write_text(json.dumps(record))
    return record


def test_two_jobs_taking_over_one_stale_lock_at_once_end_with_one_owner(tmp_path, monkeypatch):
    """Job B judges the lock stale; before B acts, job A takes it over and writes its own. B must not remove
    A's lock (the old code unlinked by path: both then held the store)."""
    store = tmp_path / "s.zarr"
    write_stale_lock(store)
    judge, rival = StoreLock._stale_reason, {}

    def judge_then_let_the_rival_in(self, owner):
        reason = judge(self, owner)
        if reason is not None and not rival:  # B's judgement, then A's whole take-over, then B goes on
            monkeypatch.setattr(StoreLock, "_stale_reason", judge)
            rival["lock"] = StoreLock(store, heartbeat=3600).acquire()
            monkeypatch.setattr(StoreLock, "_stale_reason", judge_then_let_the_rival_in)
        return reason

    monkeypatch.setattr(StoreLock, "_stale_reason", judge_then_let_the_rival_in)
    with pytest.raises(StoreLockedError, match="another job is writing it"):
        StoreLock(store, heartbeat=3600).acquire()  # job B
    winner = rival["lock"]
    assert read_lock_record(lock_path_for(store))["token"] == winner.token
    assert not list(tmp_path.glob("*.stale-*"))  # B's renamed copy is gone, A's lock is back in place
    winner.release()


def test_a_late_taker_puts_back_the_lock_it_did_not_judge(tmp_path):
    store = tmp_path / "s.zarr"
    stale = write_stale_lock(store)
    winner = StoreLock(store, heartbeat=3600).acquire()
    late = StoreLock(store)
    assert late._take_over(stale) is False  # what it renamed was the winner's live lock: put back
    assert read_lock_record(lock_path_for(store))["token"] == winner.token
    winner.release()


def test_a_job_that_lost_its_lock_stops_writing(tmp_path):
    store_path = tmp_path / "s.zarr"
    lock = StoreLock(store_path, heartbeat=0.05).acquire()
    plan = plan_slide(random_image(256, 256), store_path, varied_unet(), tile_size=64, mpp=0.5, lock_token=lock.token,
                      shard_tiles=2)  # fmt: skip
    first, second = plan.shards[:2]
    plan.store.write_shard(first, np.ones((128, 128), np.uint8))
    rival = {"host": "other-host", "pid": 1, "start": None, "since": time.time(), "token": "rival"}
    lock.path.write_text(json.dumps(rival))  # another job took the lock over (it judged ours stale)
    assert lock.lost.wait(timeout=5), "the heartbeat did not notice"
    plan.store._lock_checked = -1e9  # the writers' next check (at most LOCK_CHECK_SECONDS later)
    with pytest.raises(StoreLockLostError, match="this job lost its lock .*host other-host"):
        plan.store.write_shard(second, np.ones((128, 128), np.uint8))
    assert not plan.store.done_shards()[second.row, second.col]  # not marked done
    with pytest.raises(StoreLockLostError):
        plan.store.check_lock()  # what finalize checks before it marks the store complete
    lock.release()
    assert read_lock_record(lock.path)["token"] == "rival"  # the loser never removes the rival's lock


# --------------------------------------------------------------------------- whose store is it
def test_overwrite_never_replaces_another_slides_store_in_a_batch(tmp_path):
    import tifffile

    first, second = tmp_path / "site1" / "case 7.tiff", tmp_path / "site2" / "case_7.tiff"
    for path, seed in ((first, 0), (second, 1)):
        path.parent.mkdir()
        tifffile.imwrite(path, random_image(96, 80, seed=seed), photometric="rgb")
    out, model = tmp_path / "out", varied_unet()
    config = BatchConfig(tile_size=64, level=0, tissue_mask=None, previews=False)
    def plan(slide, config):  # what the batch does for one slide: lock its output, plan it (here, not in a task)
        locks: dict = {}
        (request,) = slide_items([slide], out, model, config, locks)
        try:
            return plan_remote(request, model)
        finally:
            for lock in locks.values():
                lock.release()

    made = plan(first, config)
    assert made.store.path == str(out / "case_7.zarr")
    with pytest.raises(OutputExistsError, match="holds the result of another slide.*site1/case 7.tiff"):
        plan(second, BatchConfig(**{**config.__dict__, "overwrite": True}))
    assert read_provenance(out / "case_7.zarr")["source"] == str(first)
    segment_slide(second, out / "case_7.zarr", model, tile_size=64, overwrite=True)  # named explicitly: allowed
    assert read_provenance(out / "case_7.zarr")["source"] == str(second)


def test_clean_up_removes_only_this_stores_own_leftovers(tmp_path):
    store = tmp_path / "a.zarr"
    leftovers = [tmp_path / "a.zarr.creating-4242", tmp_path / "a.zarr.replaced-4243"]
    others = [tmp_path / "a.zarr.creating-7.zarr", tmp_path / "a.zarr.creating-x", tmp_path / "ab.zarr.creating-1"]
    store.mkdir()
    for path in leftovers + others:
        path.mkdir()
    remove_stale_siblings(store)
    assert not any(path.exists() for path in leftovers)
    assert all(path.exists() for path in others)


def test_a_kill_between_the_two_renames_of_an_overwrite_keeps_the_old_store(tmp_path):
    """On disk after such a kill: the old store moved aside, the new one still under its building name."""
    path, image = tmp_path / "s.zarr", random_image(130, 100)
    old = segment_slide(image, path, varied_unet(), tile_size=64, mpp=0.5)
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    os.rename(path, tmp_path / "s.zarr.replaced-99999")
    (tmp_path / "s.zarr.creating-99999").mkdir()
    plan = plan_slide(image, path, varied_unet(), tile_size=64, mpp=0.5, resume=True)  # the next run
    assert plan.complete and old.status == "complete"
    assert {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]  # the new store's leftover is removed


def test_an_overwrite_interrupted_at_its_second_rename_puts_the_old_store_back(tmp_path, monkeypatch):
    import pipeline.store.output_store as store_module

    path, image = tmp_path / "s.zarr", random_image(130, 100)
    segment_slide(image, path, varied_unet(), tile_size=64, mpp=0.5)
    real, calls = store_module.durable_replace, []

    def interrupted(source, target):
        calls.append((Path(source).name, Path(target).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, or a signal, between the renames
        real(source, target)

    monkeypatch.setattr(store_module, "durable_replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plan_slide(image, path, varied_unet(seed=3), tile_size=64, mpp=0.5, overwrite=True)
    assert read_provenance(path)["status"] == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["s.zarr"]


def test_a_symlinked_store_can_be_overwritten_and_later_runs_still_work(tmp_path):
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "out"
    elsewhere.mkdir(), out.mkdir()
    image = random_image(130, 100)
    segment_slide(image, elsewhere / "s.zarr", varied_unet(), tile_size=64, mpp=0.5)
    (out / "s.zarr").symlink_to(elsewhere / "s.zarr")
    (out / "s.zarr.creating-31337").symlink_to(elsewhere)  # a stale leftover that is a link: never followed
    segment_slide(image, out / "s.zarr", varied_unet(seed=2), tile_size=64, mpp=0.5, overwrite=True)
    segment_slide(image, out / "s.zarr", varied_unet(seed=2), tile_size=64, mpp=0.5, resume=True)
    assert read_provenance(out / "s.zarr")["status"] == "complete"
    assert read_provenance(elsewhere / "s.zarr")["status"] == "complete"  # the link's target is left alone
    assert sorted(p.name for p in out.iterdir()) == ["s.zarr"]


# --------------------------------------------------------------------------- the command line
@pytest.mark.slow
def test_the_output_folder_given_as_input_is_no_slides_and_exit_1(tmp_path):
    out = tmp_path / "out"
    (out / "old.zarr").mkdir(parents=True)
    done = run_cli(str(out), "--out", str(out), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("ERROR ")]
    assert f"{out}: inside the output folder" in line


@pytest.mark.slow
def test_a_run_report_that_cannot_be_written_fails_the_job(tmp_path):
    import tifffile

    blank = tmp_path / "blank.tif"  # all glass: no tile needs the model, so no Ray either
    tifffile.imwrite(blank, np.full((300, 300, 3), 245, np.uint8), photometric="rgb")
    out = tmp_path / "out"
    (out / "run-reports").parent.mkdir(parents=True)
    (out / "run-reports").write_text("a file where the reports' folder goes")
    done = run_cli(str(blank), "--out", str(out), "--level", "0", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "run report could not be written" in done.stderr
    assert read_provenance(out / "blank.zarr")["status"] == "complete"


def test_concurrent_run_reports_never_share_a_file_and_never_overwrite_one(tmp_path):
    from pipeline.inference.report import RunReport

    errors: list[BaseException] = []
    paths: list[Path] = []

    def write_many(tag: str) -> None:
        try:
            for _ in range(30):  # all in the same second, from one pid: each still gets its own file
                paths.append(RunReport(tmp_path, {"job": tag}, 0.0).finish([], 1.0))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write_many, args=(tag,)) for tag in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(paths)) == 60 and len(list((tmp_path / "run-reports").iterdir())) == 60
    assert all(read_run_report(path)["settings"]["job"] in "ab" for path in paths)


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(tmp_path):
    import csv

    from pipeline.analysis.summary import write_csv

    class Summary:  # what write_csv needs of a SlideSummary: its row
        def __init__(self, slide: str) -> None:
            self.slide = slide

        def row(self) -> dict:
            return {"slide": self.slide, "=HYPERLINK(\"x\") count": 3, "area": -1.5}

    names = ["=cmd|' /C calc'!A0", "+1", "-2+3", "@SUM(A1)", "\tx", "plain"]
    path = write_csv([Summary(name) for name in names], tmp_path / "summary.csv")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1].startswith("'=")
    assert [row[0] for row in rows[1:]] == ["'" + n for n in names[:-1]] + ["plain"]
    assert rows[1][2] == "-1.5"  # numbers stay numbers
