"""Decoding many files, optionally in DataLoader worker processes, in input order.

Workers decode and resample (CPU-bound, releases the main process for the batched forward pass);
a file that fails yields a `Decoded` with `error` set instead of stopping the stream.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import AudioDecodeError, ClapError
from .decode import read_mono, to_model_rate


@dataclass
class Decoded:
    path: str
    samples: np.ndarray | None  # (T,) float32 at the model rate; None on error
    sample_rate: int | None = None  # of the source file
    channels: int | None = None  # of the source file
    error: str | None = None  # why it failed, without the path (callers report the path themselves)


def decode_one(path: str, sample_rate: int, quantize: bool) -> Decoded:
    try:
        mono, info = read_mono(path)
        if len(mono) == 0:
            return Decoded(path, None, info.sample_rate, info.channels, error="no audio frames")
        samples = to_model_rate(mono, info.sample_rate, sample_rate, quantize)
        return Decoded(path, samples, info.sample_rate, info.channels)
    except AudioDecodeError as exc:
        return Decoded(path, None, error=exc.reason)
    except ClapError as exc:
        return Decoded(path, None, error=str(exc))
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        return Decoded(path, None, error=f"{type(exc).__name__}: {exc}")


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], sample_rate: int, quantize: bool):
        self.paths, self.sample_rate, self.quantize = paths, sample_rate, quantize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Decoded:
        return decode_one(self.paths[i], self.sample_rate, self.quantize)


def _identity(x):
    return x


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
    )
    yield from loader
