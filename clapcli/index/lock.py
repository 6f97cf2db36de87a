"""The writer lock: one `clap index` writes an index at a time; and the graph lock beside it.

Readers (search, `clap index list`) never take the writer lock, except for the moment a read-only open
upgrades an older schema (see schema.py). The lock is an OS file lock (flock, through `filelock`) on
`writer.lock` in the index directory, so it is released when the holder exits, even by SIGKILL. Beside it,
`writer.lock.pid` names the holder (its pid and what it is) so that a refused writer can say who holds the
lock; it is written atomically and may be stale after a kill, which only affects that message.

The graph lock (`vectors.hnsw.lock`) is held only while the hnswlib file and its sidecar are written
(ann.py): by a search that saves its refreshed graph (without waiting) and by `clap index` at the end of a
run, so a search never stops a writer from starting.

A lock file is never deleted while the index lives: deleting a locked path lets a waiter lock the old inode
while a newcomer creates and locks a new one, and both would believe they hold the lock. (filelock releases
3.20.4 to 3.29.4 did that on every release; pyproject.toml excludes them.)
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from ..errors import IndexStoreError
from ..pidlock import PidLock

LOCK_FILE = "writer.lock"
LOCK_PID_FILE = LOCK_FILE + ".pid"  # sidecar naming the holder (pidlock.py), so a refused writer can say who
GRAPH_LOCK_FILE = "vectors.hnsw.lock"  # held while the hnswlib file and its sidecar are written
WRITER = "another `clap index`"  # what holds the writer lock, unless the holder says otherwise


def lock_holder(index_dir: str | os.PathLike) -> tuple[int | None, str]:
    """(pid, what it is) of the current (or last) holder of the writer lock, as far as known."""
    pid, what = PidLock(index_dir, LOCK_FILE).holder()
    return pid, what or WRITER


def lock_holder_pid(index_dir: str | os.PathLike) -> int | None:
    """The pid recorded by the current (or last) holder of the writer lock, if known."""
    return lock_holder(index_dir)[0]


class WriterLock:
    """Context manager: hold the writer lock of an index directory (created if missing).

    With `wait=False` a lock held by another process (or another `WriterLock` in this one) raises
    `IndexStoreError` naming the holder's pid; with `wait=True` it blocks until the lock is free, or
    until `timeout` seconds have passed (then `IndexStoreError` too). `holder` is what a refused writer
    is told holds the lock (default: another `clap index`).
    """

    def __init__(self, index_dir: str | os.PathLike, wait: bool = False, timeout: float | None = None,
                 holder: str = WRITER):
        self.index_dir = Path(index_dir)
        self.wait = wait
        self.timeout = timeout
        self._lock = PidLock(self.index_dir, LOCK_FILE, holder)

    @property
    def held(self) -> bool:
        return self._lock.held

    def acquire(self) -> "WriterLock":
        if self.held:
            raise RuntimeError("WriterLock is not reentrant")
        try:
            self.index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexStoreError(f"cannot create index directory {self.index_dir}: {e.strerror or e}") from e
        timeout = (-1 if self.timeout is None else self.timeout) if self.wait else 0
        try:
            acquired = self._lock.try_acquire(timeout)
        except OSError as e:
            raise IndexStoreError(f"cannot lock index {self.index_dir}: {e.strerror or e}") from e
        if not acquired:
            pid, what = lock_holder(self.index_dir)
            who = f"pid {pid}" if pid is not None else "pid unknown"
            if self.wait:
                raise IndexStoreError(
                    f"index {self.index_dir} is still being written by {what} ({who}) "
                    f"after waiting {self.timeout:g} s; pass --wait to wait until it is done"
                )
            raise IndexStoreError(
                f"index {self.index_dir} is being written by {what} ({who}); wait for it or pass --wait"
            )
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class GraphLock:
    """Context manager: hold the graph lock of an index directory while writing `vectors.hnsw` (ann.py).

    `acquire(timeout)` returns False when another process holds it after `timeout` seconds (0: do not wait),
    or when the lock file cannot be made (a read-only directory); nothing is then to be written.
    """

    def __init__(self, index_dir: str | os.PathLike):
        self._lock = filelock.FileLock(str(Path(index_dir) / GRAPH_LOCK_FILE), thread_local=False)

    def acquire(self, timeout: float = 0) -> bool:
        try:
            self._lock.acquire(timeout=timeout)
        except (filelock.Timeout, OSError):
            return False
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
