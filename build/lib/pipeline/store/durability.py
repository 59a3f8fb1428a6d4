"""Making writes survive a power loss: fsync files, and the folders whose entries changed.

A write, or a rename, is in the page cache until it is synced: a killed process loses nothing (the kernel
still has it), a power loss or kernel crash loses it. A file's contents are durable after ``fsync`` on the
file; its *name* (a new file, a rename, a new folder) is durable only after ``fsync`` on the folder that
holds the name. zarr writes every chunk and ``zarr.json`` by temp file + rename and syncs nothing, so the
store calls these after each write whose durability a later step relies on ("done" in ``tiles/state``,
``status: complete``, a store renamed into place).

Every sync goes through :func:`fsync_path`, so a test can record which paths were synced.
"""

from __future__ import annotations

import glob
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_files(files: Iterable[Path], up_to: Path, named: set[Path] | None = None) -> int:
    """fsync ``files`` that exist, each folder holding them, and the folders between them and ``up_to``.

    A file's folder is synced every time (the file's name may be new: zarr renames each chunk into place).
    Higher folders only until one whose name is already durable: a write may have created them (zarr makes
    ``c/<row>/`` on demand) and a new folder's name lives in its parent. ``named`` remembers the folders
    whose names were made durable; it belongs to one store's life (an overwritten store's folders come
    back under the same paths, even the same inodes, so a process-wide memory would skip their syncs).
    ``up_to`` is the top: its own name is the caller's concern. Returns the number of fsync calls."""
    up_to = Path(up_to)
    named = set() if named is None else named
    synced: set[Path] = set()

    def sync(path: Path) -> None:
        if path not in synced:
            fsync_path(path)
            synced.add(path)

    for file in files:
        try:
            fsync_path(file)
        except FileNotFoundError:  # a chunk equal to the fill value is not stored: nothing to sync
            continue
        synced.add(Path(file))
        folder = Path(file).parent
        sync(folder)
        while folder != up_to and up_to in folder.parents and folder not in named:
            sync(folder.parent)
            named.add(folder)
            folder = folder.parent
    return len(synced)


PER_FILE_LIMIT = 512  # trees with more files are synced with one syncfs: one fsync per new file costs ~1-3 ms


def sync_tree(root: str | os.PathLike) -> int:
    """fsync every file and folder under ``root`` (files first, then folders, deepest first), and ``root``.

    A tree of more than ``PER_FILE_LIMIT`` files (a store of a big slide holds one state file per skipped
    tile, 100,000+) is made durable by one ``syncfs`` of its filesystem instead (Linux; elsewhere ``sync``).
    Returns the number of fsync calls (0 after a syncfs)."""
    root = Path(root)
    walked = list(os.walk(root))
    if sum(len(names) for _, _, names in walked) > PER_FILE_LIMIT:
        sync_filesystem(root)
        return 0
    calls = 0
    for folder, _, names in walked:
        for name in names:
            fsync_path(os.path.join(folder, name))
            calls += 1
    for folder in sorted((Path(f) for f, _, _ in walked), key=lambda f: -len(f.parts)):
        fsync_path(folder)
        calls += 1
    return calls


def sync_filesystem(path: str | os.PathLike) -> None:
    """Everything written to the filesystem holding ``path`` (data and names) reaches the disk: ``syncfs``."""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "syncfs") or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def durable_mkdir(folder: str | os.PathLike) -> Path:
    """``mkdir -p`` whose new folders survive a power loss: each created folder's parent is synced."""
    folder = Path(folder)
    missing = [folder, *folder.parents]
    missing = [f for f in missing if not f.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for created in sorted(missing, key=lambda f: -len(f.parts)):  # deepest first: its parent may be new too
        fsync_path(created.parent)
    return folder


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp sibling of ``path`` to write; on success it is fsync'ed and renamed to ``path`` (durably),
    on failure removed: readers see the old file or the whole new one, never a part. The temp name is this
    process's own (``.<name>.<pid>-<random>.partial``), so concurrent writers never share it."""
    path = Path(path)
    _remove_dead_temps(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        yield tmp
        fsync_path(tmp)
        durable_replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_dead_temps(path: Path) -> None:
    """Remove temp files of ``path`` left by killed writers on this host (their pid is gone), so kill -9 during a
    big write (a demo slide, a checkpoint) does not leave gigabytes behind; a live writer's temp is kept."""
    for temp in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
        pid = temp.name[len(path.name) + 2 :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and os.path.exists("/proc/self"):
            temp.unlink(missing_ok=True)


def durable_replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``os.replace`` and fsync the folder(s) whose entries it changed, so the rename survives a power loss."""
    os.replace(source, target)
    folders = {Path(source).parent, Path(target).parent}
    for folder in folders:
        fsync_path(folder)
