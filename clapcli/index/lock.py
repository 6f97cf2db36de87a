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

from ..atomic import atomic_write
from ..errors import IndexStoreError

LOCK_FILE = "writer.lock"
LOCK_PID_FILE = "writer.lock.pid"  # sidecar naming the holder, so a refused writer can say who holds it
GRAPH_LOCK_FILE = "vectors.hnsw.lock"  # held while the hnswlib file and its sidecar are written
WRITER = "another `clap index`"  # what holds the writer lock, unless the holder says otherwise


def lock_holder(index_dir: str | os.PathLike) -> tuple[int | None, str]:
    """(pid, what it is) of the current (or last) holder of the writer lock, as far as known."""
    try:
        lines = (Path(index_dir) / LOCK_PID_FILE).read_text().splitlines()
    except OSError:
        return None, WRITER
    try:
        pid = int(lines[0]) if lines and lines[0].strip() else None
    except ValueError:
        pid = None
    what = lines[1].strip() if len(lines) > 1 and lines[1].strip() else WRITER
    return pid, what


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
        self.holder = holder
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
            pid, what = lock_holder(self.index_dir)
            who = f"pid {pid}" if pid is not None else "pid unknown"
            if self.wait:
                raise IndexStoreError(
                    f"index {self.index_dir} is still being written by {what} ({who}) "
                    f"after waiting {self.timeout:g} s; pass --wait to wait until it is done"
                ) from None
            raise IndexStoreError(
                f"index {self.index_dir} is being written by {what} ({who}); wait for it or pass --wait"
            ) from None
        except OSError as e:
            raise IndexStoreError(f"cannot lock index {self.index_dir}: {e.strerror or e}") from e
        self._lock = lock
        try:
            atomic_write(self.index_dir / LOCK_PID_FILE, f"{os.getpid()}\n{self.holder}\n")
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
