"""One job per output store: a lock file beside the store that a crashed job never leaves stuck.

``<name>.zarr.lock`` is created with O_CREAT | O_EXCL (atomic on local disks and NFSv3+) and holds the
owner's host, pid, process start time and a random token. While the owner runs, a heartbeat thread touches
it. Another job treats the lock as stale, and takes it over, when the owner is on this host and its process
is gone (or the pid now belongs to a later process), or when the heartbeat is older than ``stale_after``
seconds (an owner on another host that died). Otherwise the store is refused with a message that names the
owner.

Taking over is atomic: the stale lock is renamed to a unique name (only one of several racing jobs can
rename it) and its record compared with the stale one that was judged; a lock that changed in between is
put back. The heartbeat checks the token each beat and stops refreshing a lock that is no longer its own;
the store's writers check the token too (:func:`check_lock_owner`), so a job that lost its lock stops.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # 20 missed heartbeats: the owner (on another host) is gone


class StoreLockedError(RuntimeError):
    """Another live job is writing this output store."""


class StoreLockLostError(StoreLockedError):
    """This job's lock on a store was taken over by another job: it must stop writing the store."""


def lock_path_for(store_path: str | Path) -> Path:
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".lock")


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "since": time.time(),
            "token": uuid.uuid4().hex}  # fmt: skip


def read_lock_record(lock_path: Path) -> dict:
    """The owner record in a lock file ({} if it is absent, empty or unreadable)."""
    try:
        record = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def taken_over(record: dict, token: str) -> bool:
    """Whether a lock record shows another job's lock. Only another token counts: a record that is missing or
    unreadable for a moment (a storage hiccup, a rival's take-over putting the lock back) is not a loss."""
    return bool(record.get("token")) and record["token"] != token


def check_lock_owner(store_path: str | Path, token: str) -> None:
    """Raise :class:`StoreLockLostError` if another job holds the store's lock now (not ``token``, ours)."""
    record = read_lock_record(lock_path_for(store_path))
    if taken_over(record, token):
        raise StoreLockLostError(
            f"{store_path}: this job lost its lock (now held by host {record.get('host')}, pid {record.get('pid')}); "
            "it stopped writing the store: run the command again once the other job is done to finish it"
        )


class StoreLock:
    """Exclusive lock on one output store; ``with StoreLock(path): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, store_path: str | Path, stale_after: float = STALE_AFTER_SECONDS,
                 heartbeat: float = HEARTBEAT_SECONDS) -> None:  # fmt: skip
        self.store_path = Path(store_path)
        self.path = lock_path_for(store_path)
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False
        self.token: str | None = None
        self.lost = threading.Event()  # set by the heartbeat when another job took the lock over

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = _owner_record()
        for _ in range(5):  # a stale lock removed by us (or a racing job) is retried
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                reason = self._stale_reason(owner)
                if reason is None:
                    raise StoreLockedError(
                        f"{self.store_path}: another job is writing it (host {owner.get('host')}, pid {owner.get('pid')}); "
                        f"wait for it to finish, or delete {self.path.name} if that job is gone"
                    ) from None
                if self._take_over(owner):
                    logger.warning("%s: took over a stale lock (%s)", self.store_path, reason)
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(json.dumps(record).encode())
                handle.flush()
                os.fsync(handle.fileno())
            self.token, self._held = record["token"], True
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"lock:{self.store_path.name}", daemon=True)
            self._thread.start()
            return self
        raise StoreLockedError(f"{self.store_path}: could not take its lock {self.path}; another job keeps taking it")

    def _take_over(self, stale: dict) -> bool:
        """Remove the stale lock whose record is ``stale``, atomically: True if this job removed it.

        The lock is renamed to a name only this job uses; if what was renamed is not the stale record (a
        rival took the lock over and wrote its own in between), it is put back without replacing anything."""
        aside = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another job removed it first: try to create ours
            return False
        if read_lock_record(aside) == stale:
            aside.unlink(missing_ok=True)
            return True
        try:
            os.link(aside, self.path)  # put the rival's live lock back, unless yet another lock exists now
        except FileExistsError:
            pass
        except OSError:  # no hard links (some FUSE/SMB mounts): put it back by rename if the name is still free
            if not self.path.exists():
                os.rename(aside, self.path)
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._read_owner().get("token") == self.token:  # never remove a lock that was taken over
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if taken_over(self._read_owner(), self.token):
                logger.error("%s: another job took over this job's lock; its writes to the store stop", self.store_path)
                self.lost.set()
                return
            try:
                os.utime(self.path)
            except OSError as error:  # the lock vanished or the disk is gone: the writes will report it
                logger.warning("%s: cannot refresh lock (%s)", self.path, error)

    def _read_owner(self) -> dict:
        return read_lock_record(self.path)

    def _stale_reason(self, owner: dict) -> str | None:
        """Why the existing lock can be taken over, or None while its owner may be alive."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it was just released"
        pid = owner.get("pid")
        if owner.get("host") == socket.gethostname() and isinstance(pid, int):
            if not _pid_alive(pid):
                return f"its job, pid {pid}, is gone"
            if owner.get("start") is not None and _process_start(pid) != owner["start"]:
                return f"pid {pid} now belongs to another process"
            return None
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        if not owner and age > 5:  # unreadable lock (crash between create and write)
            return "it is empty"
        return None
