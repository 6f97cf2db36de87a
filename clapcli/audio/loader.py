"""Decoding many files, optionally in DataLoader worker processes, in input order.

Workers decode and resample (CPU-bound, releases the main process for the batched forward pass);
a file that fails yields a `Decoded` with `error` set instead of stopping the stream. Workers die with the
process that started them (see `die_with_parent`), so a killed `clap index` leaves no decoder behind.

`iter_decoded` hands over whole decoded files (short clips: training shards); embedding streams files in
blocks instead (`clapcli.audio.stream.iter_pieces`, whose workers start the same way).
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import DATA_FAILURE, AudioDecodeError, ClapError, failure_kind
from .decode import read_mono, to_model_rate


@dataclass
class Decoded:
    path: str
    samples: np.ndarray | None  # (T,) float32 at the model rate; None on error
    sample_rate: int | None = None  # of the source file
    channels: int | None = None  # of the source file
    error: str | None = None  # why it failed, without the path (callers report the path themselves)
    partial: str | None = None  # why only part of the file decoded (`samples` holds that part)
    error_kind: str | None = None  # DATA_FAILURE or ENVIRONMENT_FAILURE (errors.failure_kind), with `error`


def decode_one(path: str, sample_rate: int, quantize: bool) -> Decoded:
    try:
        mono, info = read_mono(path)
        if len(mono) == 0:
            return Decoded(path, None, info.sample_rate, info.channels, error="no audio frames",
                           error_kind=DATA_FAILURE)
        samples = to_model_rate(mono, info.sample_rate, sample_rate, quantize)
        return Decoded(path, samples, info.sample_rate, info.channels, partial=info.partial)
    except AudioDecodeError as exc:
        return Decoded(path, None, error=exc.reason, error_kind=failure_kind(exc))
    except ClapError as exc:
        return Decoded(path, None, error=str(exc), error_kind=failure_kind(exc))
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        return Decoded(path, None, error=f"{type(exc).__name__}: {exc}", error_kind=failure_kind(exc))


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], sample_rate: int, quantize: bool):
        self.paths, self.sample_rate, self.quantize = paths, sample_rate, quantize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        return decode_one(self.paths[i], self.sample_rate, self.quantize)


def _identity(x):
    return x


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal this process gets when its parent dies
PARENT_CHECK_SECONDS = 1.0  # how often the watchdog (where prctl is missing) looks for its parent


def die_with_parent(parent_pid: int, worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker dies when `parent_pid` does, even by SIGKILL.

    A worker orphaned while its results wait in a full pipe would otherwise block at exit for ever (its
    queue's feeder thread never finishes writing). On Linux the kernel sends SIGKILL when the parent dies
    (prctl PR_SET_PDEATHSIG); elsewhere a daemon thread polls `os.getppid()`."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before prctl took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


# Starting worker processes costs about a second each; below this many files decoding inline is faster.
MIN_FILES_FOR_WORKERS = 32


def iter_decoded(paths: Iterable, sample_rate: int, quantize: bool = True, workers: int = 0) -> Iterator[Decoded]:
    paths = [os.fspath(p) for p in paths]
    if workers <= 0 or len(paths) < MIN_FILES_FOR_WORKERS:
        for p in paths:
            yield decode_one(p, sample_rate, quantize)
        return
    loader = torch.utils.data.DataLoader(
        _Files(paths, sample_rate, quantize),
        batch_size=None,
        num_workers=min(workers, len(paths)),
        collate_fn=_identity,
        prefetch_factor=2,  # decoded files waiting per worker: bounded, long files are big
        persistent_workers=False,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )
    yield from loader
