"""The run lock: one process writes a training run folder at a time.

Two `clap train --out RUN` (or a `--resume` while the first run is alive) would otherwise write one folder,
each pruning the other's step checkpoints. Rank 0 holds an OS file lock (flock, through `filelock`, as the
index's writer lock in `index/lock.py`) on `RUN/run.lock` for the run's whole lifetime, so it is released
when the holder exits, even by SIGKILL. Beside it, `run.lock.pid` names the holder so that a refused run
can say who holds the lock; it is written atomically and may be stale after a kill, which only affects that
message.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import TrainingError, UsageError
from ..pidlock import PidLock

LOCK_FILE = "run.lock"
LOCK_PID_FILE = LOCK_FILE + ".pid"  # sidecar naming the holder (pidlock.py), so a refused run can say who
LOCK_FILES = (LOCK_FILE, LOCK_PID_FILE)


def lock_holder_pid(run_dir: str | os.PathLike) -> int | None:
    """The pid recorded by the current (or last) holder of the run lock, if known."""
    return PidLock(run_dir, LOCK_FILE).holder()[0]


class RunLock:
    """Context manager: hold the lock of a run folder (created if missing), or fail at once naming the holder.

    `enabled=False` (every rank but 0) makes it do nothing."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._lock = PidLock(self.run_dir, LOCK_FILE, "clap train")

    def acquire(self) -> "RunLock":
        if not self.enabled:
            return self
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UsageError(f"{self.run_dir} exists and is not a clap training run; choose another --out")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            acquired = self._lock.try_acquire(timeout=0)
        except OSError as e:
            raise TrainingError(f"cannot lock the run directory {self.run_dir}: {e.strerror or e}") from e
        if not acquired:
            pid = lock_holder_pid(self.run_dir)
            raise TrainingError(f"{self.run_dir} is in use by another training run (pid "
                                f"{pid if pid is not None else 'unknown'}); wait for it to end, or choose "
                                "another --out")
        return self

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
