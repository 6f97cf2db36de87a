"""Where indexes live, and the lock that allows one writer per index at a time.

An index is a directory. `resolve_index` maps the `--index NAME|PATH` option to it: nothing means the
default index, a bare name means a named index under `<clap_home>/indexes/`, anything that looks like a
path is used as given. `WriterLock` is the one-writer-at-a-time rule of `clap index`; readers (search)
never take it, except non-blocking to save a refreshed hnswlib file.
"""

from __future__ import annotations

import os
from pathlib import Path

import filelock

from ..errors import IndexStoreError, UsageError
from ..home import clap_home

DEFAULT_INDEX_NAME = "default"
LOCK_FILE = "writer.lock"
LOCK_PID_FILE = "writer.lock.pid"  # sidecar naming the holder, so a refused writer can say who holds it


def indexes_dir() -> Path:
    """The directory that holds the named indexes."""
    return clap_home() / "indexes"


def resolve_index(name_or_path: str | os.PathLike | None) -> Path:
    """The directory of an index: None → the default index, a bare name → a named index, else a path.

    A bare name has no path separator and does not start with "." or "~" (so `.`, `..`, `./x` and `~/x`
    are paths). Paths are made absolute but symlinks are kept as given.
    """
    if name_or_path is None:
        return indexes_dir() / DEFAULT_INDEX_NAME
    text = os.fspath(name_or_path)
    if not text:
        raise UsageError("empty index name; pass a name or a directory to --index")
    separators = {os.sep} | ({os.altsep} if os.altsep else set())
    is_bare_name = not any(s in text for s in separators) and not text.startswith((".", "~"))
    if isinstance(name_or_path, os.PathLike) or not is_bare_name:
        return Path(os.path.abspath(Path(text).expanduser()))
    return indexes_dir() / text


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
    until `timeout` seconds have passed (then `IndexStoreError` too). The lock is an OS file lock
    (flock), so it is released when the holder exits, even by SIGKILL; the pid sidecar may then be
    stale, which only affects the message.
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
            _write_pid(self.index_dir / LOCK_PID_FILE)
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


def _write_pid(path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
