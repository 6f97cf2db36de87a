"""The writer lock: one `clap index` writes an index at a time.

Readers (search) never take it, except non-blocking to save a refreshed hnswlib file (see ann.py). The
lock is an OS file lock (flock, through `filelock`) on `writer.lock` in the index directory, so it is
released when the holder exits, even by SIGKILL. Beside it, `writer.lock.pid` names the holder so that a
refused writer can say who holds the lock; it is written atomically and may be stale after a kill, which
only affects that message.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from ..atomic import atomic_write
from ..errors import IndexStoreError

LOCK_FILE = "writer.lock"
LOCK_PID_FILE = "writer.lock.pid"  # sidecar naming the holder, so a refused writer can say who holds it


def lock_holder_pid(index_dir: str | os.PathLike) -> int | None:
    """The pid recorded by the current (or last) holder of the writer lock, if known."""
    try:
        text = (Path(index_dir) / LOCK_PID_FILE).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class WriterLock:
    """Context manager: hold the writer lock of an index directory (created if missing).

    With `wait=False` a lock held by another process (or another `WriterLock` in this one) raises
    `IndexStoreError` naming the holder's pid; with `wait=True` it blocks until the lock is free, or
    until `timeout` seconds have passed (then `IndexStoreError` too).
    """

    def __init__(self, index_dir: str | os.PathLike, wait: bool = False, timeout: float | None = None):
        self.index_dir = Path(index_dir)
        self.wait = wait
        self.timeout = timeout
        self._lock: filelock.FileLock | None = None

    @property
    def held(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def acquire(self) -> "WriterLock":
        if self.held:
            raise RuntimeError("WriterLock is not reentrant")
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexStoreError(f"cannot create index directory {self.index_dir}: {e.strerror or e}") from e
        lock = filelock.FileLock(str(self.index_dir / LOCK_FILE), thread_local=False)
        timeout = (-1 if self.timeout is None else self.timeout) if self.wait else 0
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            pid = lock_holder_pid(self.index_dir)
            who = f"pid {pid}" if pid is not None else "pid unknown"
            if self.wait:
                raise IndexStoreError(
                    f"index {self.index_dir} is still being written by another `clap index` ({who}) "
                    f"after waiting {self.timeout:g} s; pass --wait to wait until it is done"
                ) from None
            raise IndexStoreError(
                f"index {self.index_dir} is being written by another `clap index` ({who}); "
                "wait for it or pass --wait"
            ) from None
        except OSError as e:
            raise IndexStoreError(f"cannot lock index {self.index_dir}: {e.strerror or e}") from e
        self._lock = lock
        try:
            atomic_write(self.index_dir / LOCK_PID_FILE, f"{os.getpid()}\n")
        except OSError:
            pass  # the pid only improves a message
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            (self.index_dir / LOCK_PID_FILE).unlink(missing_ok=True)
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
