"""Durability under power loss: which files and folders get fsync'ed, and in which order.

kill -9 tests cannot see a missing fsync (the page cache survives a killed process), so these tests record
every ``os.fsync`` (the path of its descriptor) and pin that each write a later step relies on is synced
before that step: a tile's chunk files (and the folders naming them) before its "done" state, the state
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
from pipeline.inference.report import write_run_report
from pipeline.store.output_store import LABELS_PATH, TILE_DONE


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
    return plan_slide(image, tmp_path / "s.zarr", varied_unet(), tile_size=64, probabilities=True, mpp=0.5)


class RecordingArray:
    """A zarr array whose item writes are noted in the spy's log (so the log shows fsyncs and writes in order)."""

    def __init__(self, array, spy: FsyncSpy) -> None:
        self._array, self._spy = array, spy

    def __setitem__(self, key, value) -> None:
        self._spy.paths.append("<state written>")
        self._array[key] = value

    def __getattr__(self, name):
        return getattr(self._array, name)


def test_a_tile_is_synced_before_it_is_marked_done(plan, spy):
    store = plan.store
    store._arrays["tiles/state"] = RecordingArray(store._array("tiles/state"), spy)
    labels = np.random.default_rng(0).integers(1, 3, (64, 64)).astype(np.uint8)  # not the fill value: stored
    store.write_tile(store.grid.tile(1, 2), labels, np.full((3, 64, 64), 90, np.uint8))

    root = Path(store.path)
    label_chunk = root / LABELS_PATH / "0" / "c" / "1" / "2"
    prob_chunk = root / "probabilities" / "0" / "c" / "0" / "1" / "2"
    state_chunk = root / "tiles" / "state" / "c" / "1" / "2"
    before, after = spy.paths[: spy.paths.index("<state written>")], spy.paths[spy.paths.index("<state written>") :]
    for path in (label_chunk, label_chunk.parent, label_chunk.parent.parent, root / LABELS_PATH / "0",
                 prob_chunk, prob_chunk.parent, root / "probabilities" / "0"):  # fmt: skip
        assert str(path) in before, f"{path.relative_to(root)} not synced before the state; synced: {spy.paths}"
    for path in (state_chunk, state_chunk.parent, root / "tiles" / "state"):
        assert str(path) in after, f"{path.relative_to(root)} not synced after the state was written"
    assert store.tile_states()[1, 2] == TILE_DONE


def test_complete_is_written_only_after_the_pyramid_and_then_synced(plan, spy):
    store = plan.store
    for tile in plan.tiles:
        store.write_tile(tile, np.ones((64, 64), np.uint8), np.zeros((3, 64, 64), np.uint8))
    spy.clear()
    store.finalize()
    root = Path(store.path)
    level1 = root / LABELS_PATH / "1"
    pyramid_files = [p for p in level1.rglob("*") if p.is_file()]
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


def test_run_report_is_synced_and_its_rename_too(tmp_path, spy):
    report = write_run_report(tmp_path, [], {}, 0.0, 1.0)
    assert spy.paths[-2:] == [f"<renamed to {report}>", str(tmp_path)]
    assert any(p.startswith(str(tmp_path / ".run-report.json.")) for p in spy.paths)  # the temp file's contents
    assert report.read_text().startswith("{")


def test_a_store_of_many_files_is_synced_with_one_syncfs_before_its_rename(tmp_path, spy, monkeypatch):
    """A big slide's store holds one state file per skipped tile: one syncfs of the filesystem, not 100,000 fsyncs."""
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
        plan.store.write_tile(plan.tiles[0], np.ones((64, 64), np.uint8))
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
