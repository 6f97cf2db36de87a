"""An OS file lock held by one process, with a sidecar file naming the holder.

The base of the index's writer lock (`index/lock.py`) and the training run lock (`train/runlock.py`): the
lock is a `flock` through `filelock` on `DIR/NAME`, so it goes when the holder exits, even by SIGKILL; the
sidecar `DIR/NAME.pid` holds the holder's pid and a line saying what it is, written atomically, so that a
refused process can say who holds the lock (it may be stale after a kill, which only affects that message).
The lock file itself is never deleted: deleting a locked path lets a waiter lock the old inode while a
newcomer creates and locks a new one, and both would believe they hold the lock.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from .atomic import atomic_write


class PidLock:
    """`try_acquire(timeout)` → True when held (timeout −1: wait for ever, 0: do not wait), False when another
    process (or another PidLock in this one) still holds it; OSError when the lock file cannot be made."""

    def __init__(self, directory: str | os.PathLike, name: str, what: str = ""):
        self.path = Path(directory) / name
        self.pid_path = Path(directory) / f"{name}.pid"
        self.what = what
        self._lock: filelock.FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def try_acquire(self, timeout: float) -> bool:
        lock = filelock.FileLock(str(self.path), thread_local=False)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            return False
        self._lock = lock
        try:
            atomic_write(self.pid_path, f"{os.getpid()}\n{self.what}\n")
        except OSError:
            pass  # the pid only improves a message
        return True

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            self.pid_path.unlink(missing_ok=True)
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def holder(self) -> tuple[int | None, str]:
        """(pid, what it is) of the current (or last) holder, as far as the sidecar says; ("" when unsaid)."""
        try:
            lines = self.pid_path.read_text().splitlines()
        except OSError:
            return None, ""
        try:
            pid = int(lines[0]) if lines and lines[0].strip() else None
        except ValueError:
            pid = None
        return pid, lines[1].strip() if len(lines) > 1 else ""
