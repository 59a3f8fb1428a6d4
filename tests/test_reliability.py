"""Crash safety without Ray: store locks, atomic store creation, byte-identical resume after kill -9,
output-name sanitising and the one-line errors for bad slide files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import zarr

from conftest import assert_identical_stores, random_image, shared_file, tile_states_written, varied_unet
from pipeline import OutputExistsError, SlideError, open_slide, segment_slide
from pipeline.inference.engine import plan_slide
from pipeline.store.locking import StoreLock, StoreLockedError, lock_path_for
from pipeline.inference.report import output_path_for, safe_stem
from pipeline.store.output_store import read_provenance
from unet import save_model

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- locks
def test_lock_refuses_a_second_writer_and_names_the_owner(tmp_path):
    store = tmp_path / "slide.zarr"
    with StoreLock(store):
        with pytest.raises(StoreLockedError, match=rf"slide.zarr: another job is writing it .*pid {os.getpid()}"):
            StoreLock(store).acquire()
    assert not lock_path_for(store).exists()  # released
    StoreLock(store).acquire().release()  # and free again


def test_lock_left_by_a_killed_job_is_taken_over(tmp_path):
    store = tmp_path / "slide.zarr"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time; sys.path.insert(0, {str(REPO)!r})
        from pipeline.store.locking import StoreLock
        StoreLock({str(store)!r}).acquire(); print("held", flush=True); time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(StoreLockedError):
        StoreLock(store).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock_path_for(store).exists()  # a crash leaves the file behind ...
    StoreLock(store).acquire().release()  # ... but not stuck


def test_lock_of_a_reused_pid_or_a_silent_remote_host_is_stale(tmp_path):
    store = tmp_path / "slide.zarr"
    lock = lock_path_for(store)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "start": "1"}))
    StoreLock(store).acquire().release()  # our pid, but started at another time: a reused pid
    lock.write_text(json.dumps({"host": "another-node", "pid": 1, "start": "1"}))
    with pytest.raises(StoreLockedError, match="host another-node"):
        StoreLock(store).acquire()  # fresh heartbeat from another host: respected
    old = time.time() - 3600
    os.utime(lock, (old, old))
    StoreLock(store, stale_after=600).acquire().release()  # no heartbeat for an hour: taken over


# --------------------------------------------------------------------------- atomic creation, resume
def test_crash_while_creating_a_store_leaves_nothing(tmp_path, monkeypatch):
    import pipeline.store.output_store as store_module

    def crash(path, *args):
        zarr.open_group(str(path), mode="w").create_group("labels")
        raise KeyboardInterrupt  # a crash half way through creating the arrays

    monkeypatch.setattr(store_module, "_build_store", crash)
    with pytest.raises(KeyboardInterrupt):
        segment_slide(random_image(70, 90), tmp_path / "s.zarr", varied_unet(), tile_size=32)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no temp folder, no lock


def test_finalize_refuses_a_store_with_missing_tiles(tmp_path):
    model = varied_unet()
    plan = plan_slide(random_image(70, 90), tmp_path / "s.zarr", model, tile_size=32)
    with pytest.raises(RuntimeError, match="tiles are not written yet"):
        plan.finalize()
    assert read_provenance(tmp_path / "s.zarr")["status"] == "running"


ENGINE_RUN = """
import sys, numpy as np; sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
from conftest import random_image
from pipeline import segment_slide
from unet import load_model
segment_slide(random_image(300, 420, seed=2), {out!r}, load_model({model!r}), tile_size=32, batch_size=2,
              tissue_mask=np.indices((30, 42)).sum(0) > 12, resume={resume}, shard_tiles=3)
"""


def run_engine(out: Path, model_path: Path, resume: bool) -> subprocess.Popen:
    code = ENGINE_RUN.format(repo=str(REPO), tests=str(REPO / "tests"), out=str(out), model=str(model_path), resume=resume)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["creating", "tiles", "finishing"])
def test_kill_9_then_resume_gives_a_byte_identical_store(tmp_path, moment):
    """kill -9 of the engine at a moment, then resume: the store equals an uninterrupted run, file for file."""
    model_path = tmp_path / "model.pt"
    save_model(varied_unet(5), model_path, class_names=["bg", "a", "b"], mpp=0.5)
    reference = tmp_path / "reference.zarr"
    assert run_engine(reference, model_path, resume=False).wait() == 0
    total = tile_states_written(reference)  # tiles done (their shard is) or skipped

    crashed = tmp_path / "crashed.zarr"
    job = run_engine(crashed, model_path, resume=False)
    if moment == "creating":  # as soon as it holds the lock: the store is being (or about to be) built
        while job.poll() is None and not lock_path_for(crashed).exists():
            time.sleep(0.002)
    else:
        target = {"tiles": total * 2 // 3, "finishing": total}[moment]
        while job.poll() is None and tile_states_written(crashed) < target:
            time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    if crashed.exists() and tile_states_written(crashed) < total:
        assert read_provenance(crashed)["status"] == "running"  # never looks finished
    assert run_engine(crashed, model_path, resume=True).wait() == 0
    assert_identical_stores(crashed, reference)
    assert not any(p.name.endswith((".lock", ".partial")) or ".creating-" in p.name for p in tmp_path.rglob("*"))


def test_resume_refuses_a_store_made_with_another_model(tmp_path):
    image = random_image(70, 90)
    segment_slide(image, tmp_path / "s.zarr", varied_unet(1), tile_size=32)
    with pytest.raises(OutputExistsError, match="other settings.*model_checksum.*overwrite"):
        segment_slide(image, tmp_path / "s.zarr", varied_unet(2), tile_size=32, resume=True)


# --------------------------------------------------------------------------- names and bad files
@pytest.mark.parametrize("name", ["../../escape.svs", "a b/c d.svs", "Schnitt ü.svs", "..svs", "日本語.svs", "x/../.svs"])
def test_output_names_never_leave_the_output_folder(tmp_path, name):
    out = tmp_path / "out"
    path = output_path_for(name, out)
    assert path.parent == out and path.name.endswith(".zarr")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in path.name), path.name
    assert not path.name.startswith(".")


def test_safe_stem_keeps_ordinary_names_and_separates_foreign_ones():
    assert safe_stem("/slides/TCGA-AB-1234.01.svs") == "TCGA-AB-1234.01"
    assert safe_stem("Schnitt ü.svs") == "Schnitt_u"
    assert safe_stem("日本.svs") != safe_stem("中国.svs")


def bad_file(tmp_path: Path, kind: str) -> Path:
    if kind == "empty":
        path = tmp_path / "empty.svs"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.svs"
        path.write_text("patient list, not a slide\n")
    else:
        path = tmp_path / "truncated.svs"
        path.write_bytes(shared_file("slides/cmu-1-small-region.svs").read_bytes()[:300_000])
    return path


@pytest.mark.parametrize("kind, reason", [
    ("empty", "the file is empty"), ("text", "not a slide"), ("truncated", "may be truncated or corrupt"),
])  # fmt: skip
def test_bad_slide_files_get_one_line_naming_the_file(tmp_path, kind, reason):
    path = bad_file(tmp_path, kind)
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and reason in message and "\n" not in message


def test_explicit_mpp_on_a_slide_without_pixel_size_is_an_error(tmp_path):
    import tifffile

    path = tmp_path / "no-mpp.tiff"
    tifffile.imwrite(path, random_image(64, 64), photometric="rgb")  # stripped, no resolution tags
    assert open_slide(path).mpp is None  # a non-OpenSlide TIFF is read, not refused
    with pytest.raises(SlideError, match=r"no-mpp.tiff: has no µm/px metadata.*--level.*--mpp 0.5"):
        plan_slide(path, tmp_path / "o.zarr", varied_unet(), tile_size=32, target_mpp=0.5, require_mpp=True)
    plan = plan_slide(path, tmp_path / "o.zarr", varied_unet(), tile_size=32, target_mpp=0.5)  # model default
    assert plan.slide.level == 0 and not (tmp_path / "o.zarr.lock").exists()


def test_absurd_upsampling_is_refused_not_attempted():
    """boxes-generic.tiff claims 352.8 µm/px: reaching a 0.5 µm/px model would mean a 700x larger image."""
    from pipeline.slides.resolution import open_for_segmentation

    slide = shared_file("slides/boxes-generic.tiff")
    with pytest.raises(SlideError, match=r"boxes-generic.tiff: its finest level is 352.8 µm/px, 706x coarser.*--level 0"):
        open_for_segmentation(slide, target_mpp=0.5)
    assert open_for_segmentation(slide, level=0).size == (250, 300)


@pytest.mark.parametrize("level, resumable", [(0, True), (2, False)])
def test_a_store_from_before_native_reads_resumes_only_where_its_reads_were_exact(tmp_path, level, resumable):
    """Stores written before provenance recorded ``pixels`` read levels through OpenSlide regions: exact at
    level 0, shifted per tile at boxes-generic's level 2 (downsample 4.016); only the first may be finished."""
    import zarr

    slide, store = shared_file("slides/boxes-generic.tiff"), tmp_path / "old.zarr"
    plan = plan_slide(slide, store, varied_unet(), tile_size=32, level=level)
    root = zarr.open_group(str(store), mode="r+")
    old = {k: v for k, v in root.attrs["wsi_unet"].items() if k != "pixels"}
    root.attrs["wsi_unet"] = old
    if resumable:
        assert plan_slide(slide, store, varied_unet(), tile_size=32, level=level, resume=True).shards == plan.shards
    else:
        with pytest.raises(OutputExistsError, match=r"old.zarr: cannot resume.*level 2 with a sub-pixel shift.*--overwrite"):
            plan_slide(slide, store, varied_unet(), tile_size=32, level=level, resume=True)
