"""Waveform peaks for the page: per bucket of a file, the lowest and highest sample (channels averaged).

Computed once per file content and bucket count, decoding the file in blocks (`audio.decode.MonoReader`) so an
hour-long file costs a block of memory, not the hour; then kept in `peaks/` under the cache directory
(`home.cache_dir()`: `$CLAP_HOME`, else the user cache dir), keyed by the file's content hash from the index,
so a page of results over long files draws from the cache at once. Never written into the index or the library.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..audio.decode import UNKNOWN_FRAMES, MonoReader
from ..errors import AudioDecodeError
from ..home import cache_dir
from ..index.rows import FileRecord
from .reader import NotFound

DEFAULT_BUCKETS = 800
MAX_BUCKETS = 20_000
FORMAT = 1  # bump when the cached peaks change meaning


def peaks_dir() -> Path:
    return cache_dir() / "peaks"


def file_peaks(path: str, record: FileRecord, buckets: int) -> list[list[float]]:
    """[[min, max], …] of `buckets` equal stretches of the file (fewer when it has fewer samples), from the cache
    when this content was drawn before."""
    key = record.content_hash or f"{record.path}|{record.size}|{record.mtime_ns}"
    digest = hashlib.blake2b(f"{FORMAT}|{key}|{buckets}".encode(), digest_size=16).hexdigest()
    cached = peaks_dir() / f"{digest}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    try:
        values = compute_peaks(path, buckets, record)
    except AudioDecodeError as exc:
        raise NotFound(f"cannot decode file {record.id}: {exc.reason}") from None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cached, json.dumps(values, separators=(",", ":")))
    except OSError:
        pass  # a read-only or full cache costs time on the next request, never the answer
    return values


def compute_peaks(path: str, buckets: int, record: FileRecord | None = None) -> list[list[float]]:
    with MonoReader(path) as reader:
        frames = reader.info.frames
        if frames == UNKNOWN_FRAMES or frames <= 0:
            duration = record.duration if record is not None and record.duration else 0.0
            frames = max(1, int(math.ceil(duration * reader.info.sample_rate)))
        buckets = max(1, min(buckets, frames))
        lows = np.full(buckets, np.inf, dtype=np.float32)
        highs = np.full(buckets, -np.inf, dtype=np.float32)
        position = 0
        for block in reader:  # (n,) float32
            n = len(block)
            first = min(position * buckets // frames, buckets - 1)
            last = min((position + n - 1) * buckets // frames, buckets - 1)
            # where each bucket after `first` starts, as offsets into this block
            starts = np.arange(first + 1, last + 1, dtype=np.int64) * frames
            starts = -(-starts // buckets) - position
            offsets = np.concatenate([[0], np.clip(starts, 0, n - 1)]).astype(np.int64)
            ids = np.arange(first, last + 1)
            np.minimum.at(lows, ids, np.minimum.reduceat(block, offsets))
            np.maximum.at(highs, ids, np.maximum.reduceat(block, offsets))
            position += n
    empty = ~np.isfinite(lows)
    lows[empty], highs[empty] = 0.0, 0.0
    lows, highs = np.clip(lows, -1.0, 1.0), np.clip(highs, -1.0, 1.0)
    return [[round(float(a), 4), round(float(b), 4)] for a, b in zip(lows, highs)]
