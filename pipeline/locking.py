"""One job per output store: a lock file beside the store that a crashed job never leaves stuck.

``<name>.zarr.lock`` is created with O_CREAT | O_EXCL (atomic on local disks and NFSv3+) and holds the
owner's host, pid and process start time. While the owner runs, a heartbeat thread touches it. Another
job treats the lock as stale, and takes it over, when the owner is on this host and its process is gone
(or the pid now belongs to a later process), or when the heartbeat is older than ``stale_after`` seconds
(an owner on another host that died). Otherwise the store is refused with a message that names the owner.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 600.0  # 20 missed heartbeats: the owner (on another host) is gone


class StoreLockedError(RuntimeError):
    """Another live job is writing this output store."""


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
    return {"host": socket.gethostname(), "pid": pid, "start": _process_start(pid), "since": time.time()}


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

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = json.dumps(_owner_record()).encode()
        for _ in range(3):  # a stale lock removed by us (or a racing job) is retried
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
                logger.warning("%s: taking over a stale lock (%s)", self.store_path, reason)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "wb") as handle:
                handle.write(record)
            self._held = True
            self._thread = threading.Thread(target=self._beat, name=f"lock:{self.store_path.name}", daemon=True)
            self._thread.start()
            return self
        raise StoreLockedError(f"{self.store_path}: could not take its lock {self.path}; another job keeps taking it")

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._read_owner().get("pid") == os.getpid():  # never remove a lock that was taken over
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError as error:  # the lock vanished or the disk is gone: the writes will report it
                logger.warning("%s: cannot refresh lock (%s)", self.path, error)

    def _read_owner(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

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
