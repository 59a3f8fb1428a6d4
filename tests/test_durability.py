"""Durability under power loss: which files and folders get fsync'ed, and in which order.

kill -9 tests cannot see a missing fsync (the page cache survives a killed process), so these tests record
every ``os.fsync`` (the path of its descriptor) and pin that each write a later step relies on is synced
before that step: a shard's files (and the folders naming them) before its "done" mark, the mark
itself, the pyramid and ``zarr.json`` when the store becomes complete, a new store's whole tree before it is
renamed into place, and the folder of every rename.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, varied_unet
from pipeline.inference.engine import plan_slide
from pipeline.inference.report import RunReport
from pipeline.store.output_store import LABELS_PATH, TILE_DONE
from pipeline.store.shard_state import DONE_PATH


class FsyncSpy:
    """Records the path of every fsync'ed descriptor, and the order of fsyncs and state writes."""

    def __init__(self, monkeypatch) -> None:
        self.paths: list[str] = []  # synced paths, and "<renamed to TARGET>" where a rename happened
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            self.paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        def replace(source, target, **kwargs) -> None:
            real_replace(source, target, **kwargs)
            self.paths.append(f"<renamed to {target}>")

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def synced(self, path: Path) -> bool:
        return str(path) in self.paths

    def clear(self) -> None:
        self.paths.clear()


@pytest.fixture
def spy(monkeypatch) -> FsyncSpy:
    return FsyncSpy(monkeypatch)


@pytest.fixture
def plan(tmp_path):
    image = random_image(200, 150)
    return plan_slide(image, tmp_path / "s.zarr", varied_unet(), tile_size=64, probabilities=True, mpp=0.5,
                      shard_tiles=2)


class RecordingArray:
    """A zarr array whose item writes are noted in the spy's log (so the log shows fsyncs and writes in order)."""

    def __init__(self, array, spy: FsyncSpy) -> None:
        self._array, self._spy = array, spy

    def __setitem__(self, key, value) -> None:
        self._spy.paths.append("<state written>")
        self._array[key] = value

    def __getattr__(self, name):
        return getattr(self._array, name)


def test_a_shard_is_synced_before_it_is_marked_done(plan, spy):
    store = plan.store
    store._arrays[DONE_PATH] = RecordingArray(store._array(DONE_PATH), spy)
    shard = store.grid.shard(0, 1)  # tiles (0..1, 2..3): 128 x 128 px at x = 128
    h, w = shard.shape
    labels = np.random.default_rng(0).integers(1, 3, (h, w)).astype(np.uint8)  # not the fill value: stored
    store.write_shard(shard, labels, np.full((3, h, w), 90, np.uint8))

    root = Path(store.path)
    label_shard = root / LABELS_PATH / "0" / "c" / "0" / "1"
    level1_shard = root / LABELS_PATH / "1" / "c" / "0" / "1"  # level 1 comes with each shard (label_pyramid)
    prob_shard = root / "probabilities" / "0" / "c" / "0" / "0" / "1"
    done_chunk = root / DONE_PATH / "c" / "0" / "1"
    before, after = spy.paths[: spy.paths.index("<state written>")], spy.paths[spy.paths.index("<state written>") :]
    for path in (label_shard, label_shard.parent, label_shard.parent.parent, root / LABELS_PATH / "0",
                 level1_shard, level1_shard.parent, prob_shard, prob_shard.parent, root / "probabilities" / "0"):  # fmt: skip
        assert str(path) in before, f"{path.relative_to(root)} not synced before the mark; synced: {spy.paths}"
    for path in (done_chunk, done_chunk.parent, root / DONE_PATH):
        assert str(path) in after, f"{path.relative_to(root)} not synced after the mark was written"
    assert (store.tile_states()[0:2, 2:4] == TILE_DONE).all() and (store.tile_states()[2:, :] != TILE_DONE).all()


def test_complete_is_written_only_after_the_pyramid_and_then_synced(plan, spy):
    store = plan.store
    for shard in plan.shards:
        store.write_shard(shard, np.ones(shard.shape, np.uint8), np.zeros((3, *shard.shape), np.uint8))
    spy.clear()
    store.finalize()
    root = Path(store.path)
    level2 = root / LABELS_PATH / "2"  # the first level not written with the shards (label_pyramid)
    pyramid_files = [p for p in (level2 / "c").rglob("*") if p.is_file()]  # its zarr.json: synced at creation
    assert pyramid_files and all(spy.synced(p) for p in pyramid_files)
    assert spy.synced(root / "zarr.json") and spy.synced(root)
    last_pyramid = max(spy.paths.index(str(p)) for p in pyramid_files)
    assert spy.paths.index(str(root / "zarr.json")) > last_pyramid  # complete is synced after the pyramid
    assert store.status == "complete"


def test_a_new_store_is_synced_whole_before_its_rename_and_the_rename_is_synced(tmp_path, spy):
    path = tmp_path / "out" / "s.zarr"
    plan_slide(random_image(130, 100), path, varied_unet(), tile_size=64, mpp=0.5, tissue_mask=np.ones((13, 10), bool))
    building = [p for p in spy.paths if ".creating-" in p]
    files = {str(p.relative_to(path)) for p in path.rglob("*")}
    synced = {p.split(".creating-", 1)[1].split("/", 1)[1] for p in building if "/" in p.split(".creating-", 1)[1]}
    assert files <= synced, f"not synced before the rename: {sorted(files - synced)}"
    assert spy.paths[-1] == str(path.parent)  # the folder holding the new name, last
    assert str(tmp_path) in spy.paths  # and the new output folder's own name, in its parent


def test_overwrite_syncs_both_renames(tmp_path, spy):
    path = tmp_path / "s.zarr"
    image = random_image(130, 100)
    plan_slide(image, path, varied_unet(), tile_size=64, mpp=0.5)
    spy.clear()
    plan_slide(image, path, varied_unet(seed=1), tile_size=64, mpp=0.5, overwrite=True)
    ours = (f"<renamed to {path}>", f"<renamed to {path}.replaced-{os.getpid()}>")  # not zarr's own temp renames
    renames = [i for i, entry in enumerate(spy.paths) if entry in ours]
    assert [spy.paths[i] for i in renames] == [f"<renamed to {path}.replaced-{os.getpid()}>", f"<renamed to {path}>"]
    assert all(spy.paths[i + 1] == str(tmp_path) for i in renames)  # each rename synced in its folder, at once
    assert not any(".replaced-" in p.name or ".creating-" in p.name for p in tmp_path.iterdir())


def test_run_report_lines_are_synced_as_they_are_written_and_its_name_too(tmp_path, spy):
    from pipeline.inference.report import failed_result, read_run_report

    report = RunReport(tmp_path, {"job": "x"}, 0.0)
    assert spy.synced(report.path) and spy.synced(report.path.parent)  # the settings line, and the new name
    spy.clear()
    report.slide(failed_result("a.svs", "-", "a.svs: broken"))
    assert spy.paths == [str(report.path)]  # each slide's line reaches the disk when the slide is final
    path = report.finish([], 1.0)
    assert read_run_report(path)["slides"][0]["slide"] == "a.svs" and read_run_report(tmp_path)["summary"]["slides"] == 0


def test_a_store_of_many_files_is_synced_with_one_syncfs_before_its_rename(tmp_path, spy, monkeypatch):
    """A store of more files than ``PER_FILE_LIMIT`` is made durable by one syncfs of the filesystem, not an fsync each."""
    import ctypes

    from pipeline.store import durability

    assert hasattr(ctypes.CDLL(None), "syncfs")  # Linux: the real call, not the os.sync fallback
    monkeypatch.setattr(durability, "PER_FILE_LIMIT", 5)
    calls: list[str] = []
    real = durability.sync_filesystem
    monkeypatch.setattr(durability, "sync_filesystem", lambda path: calls.append(str(path)) or real(path))
    path = tmp_path / "s.zarr"
    plan_slide(random_image(130, 100), path, varied_unet(), tile_size=64, mpp=0.5, tissue_mask=np.zeros((13, 10), bool))
    assert len(calls) == 1 and ".creating-" in calls[0]
    assert spy.paths[-1] == str(tmp_path)  # then the rename, synced


def test_a_store_overwritten_in_the_same_process_syncs_its_new_folders_again(tmp_path, spy):
    """The new store's c/<row> folders come back under the old paths (often the old inodes): synced anew."""
    path, image = tmp_path / "s.zarr", random_image(130, 100)
    for seed in (0, 1):
        spy.clear()
        plan = plan_slide(image, path, varied_unet(seed=seed), tile_size=64, mpp=0.5, overwrite=seed > 0)
        shard = plan.shards[0]
        plan.store.write_shard(shard, np.ones(shard.shape, np.uint8))
        level0 = path / LABELS_PATH / "0"
        assert spy.synced(level0 / "c") and spy.synced(level0), f"run {seed}: {spy.paths}"


def test_atomic_file_removes_the_temps_of_killed_writers_only(tmp_path):
    from pipeline.store.durability import atomic_file

    dead = tmp_path / ".slide.tiff.9999999-deadbeef.partial"  # above the largest pid Linux allows: no such process
    live = tmp_path / f".slide.tiff.{os.getpid()}-cafecafe.partial"
    dead.write_bytes(b"half"), live.write_bytes(b"half")
    with atomic_file(tmp_path / "slide.tiff") as tmp:
        tmp.write_bytes(b"whole")
    assert (tmp_path / "slide.tiff").read_bytes() == b"whole"
    assert not dead.exists() and live.exists()
