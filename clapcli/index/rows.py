"""The store's rows as Python values: file records, segment rows, counts, and vectors as float32 blobs.

`store.py` holds the SQL; this module holds what goes in and comes out of it, so reading a record or
checking a vector needs no database.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..errors import DATA_FAILURE, IndexStoreError

SEGMENT_KINDS = ("file", "window")  # a whole-file embedding, or one 10 s window of a long file
VECTOR_DTYPE = np.dtype("<f4")  # embeddings are stored as little-endian float32 blobs


@dataclass(frozen=True)
class FileRecord:
    """One row of `files`: what the indexer knows about a path."""

    id: int
    path: str
    size: int  # bytes, at indexing time
    mtime_ns: int  # st_mtime_ns, at indexing time
    content_hash: str | None  # see `store.content_hash()`
    duration: float | None  # seconds (None for error rows)
    sample_rate: int | None  # Hz of the source file
    channels: int | None
    status: str  # 'ok', 'partial' (embedded from the part that decodes) or 'error'
    error: str | None  # why the file was skipped (status 'error') or only partly decoded ('partial')
    indexed_at: float  # unix time of the last write of this row
    error_kind: str | None = None  # status 'error': 'data' or 'environment' (None: stored before kinds were)

    @property
    def retried(self) -> bool:
        """An error row the next run tries again whether or not the file changed: the machine failed (or the
        row predates failure kinds), not the file."""
        return self.status == "error" and self.error_kind != DATA_FAILURE


class SegmentRow(NamedTuple):
    """A segment joined with its file, for rendering search hits."""

    segment_id: int
    path: str
    start: float  # seconds from the start of the file
    end: float  # seconds
    kind: str  # 'file' or 'window'
    duration: float | None  # of the whole file, seconds


class Counts(NamedTuple):
    files: int  # all file rows
    ok_files: int  # searchable: status 'ok' or 'partial'
    error_files: int
    segments: int
    embeddings: int


# (start s, end s, kind, embedding (D,) float32)
Segment = tuple[float, float, str, np.ndarray]


def encode_segments(segments: Sequence[Segment], dim: int | None,
                    index_dir: Path) -> list[tuple[float, float, str, bytes]]:
    """Validate segments before the database is touched; vectors become float32 blobs. `dim` is the store's
    (None while it holds no vector); `index_dir` names the index in the message when a vector does not fit."""
    if not segments:
        raise ValueError("a file needs at least one segment (its file-level embedding)")
    prepared = []
    for start, end, kind, vector in segments:
        start, end = float(start), float(end)
        if kind not in SEGMENT_KINDS:
            raise ValueError(f"segment kind must be one of {SEGMENT_KINDS}, got {kind!r}")
        if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start <= end):
            raise ValueError(f"bad segment bounds {start}..{end}")
        vector = np.asarray(vector, dtype=VECTOR_DTYPE)
        if vector.ndim != 1 or vector.size == 0:
            raise ValueError(f"a segment vector must have shape (D,), got {vector.shape}")
        if dim is None:
            dim = vector.shape[0]
        elif vector.shape[0] != dim:
            raise IndexStoreError(
                f"index {index_dir} holds {dim}-dimensional embeddings, got {vector.shape[0]}; "
                "pass the same --model or --rebuild"
            )
        if not np.isfinite(vector).all():
            raise ValueError("a segment vector contains NaN or infinity")
        prepared.append((start, end, kind, np.ascontiguousarray(vector).tobytes()))
    return prepared


def decode_vectors(rows: list, dim: int | None, index_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(segment_id, blob) rows as (ids (n,) int64, vectors (n, D) float32)."""
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    data = b"".join(r[1] for r in rows)
    if dim is None:
        dim = len(rows[0][1]) // VECTOR_DTYPE.itemsize
    if len(data) != len(rows) * dim * VECTOR_DTYPE.itemsize:
        raise IndexStoreError(
            f"index {index_dir} has embeddings of the wrong size (expected {dim} floats); "
            "rebuild it with `clap index --rebuild`"
        )
    vectors = np.frombuffer(data, dtype=VECTOR_DTYPE).reshape(len(rows), dim)  # (n, D)
    return ids, vectors.astype(np.float32, copy=False)


def concat_vectors(chunks: Iterable[tuple[np.ndarray, np.ndarray]], dim: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of (ids, vectors) as one (ids (N,), vectors (N, D)); empty ones of width `dim` (or 0) for none."""
    chunks = list(chunks)
    if not chunks:
        return np.empty(0, dtype=np.int64), np.empty((0, dim or 0), dtype=np.float32)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])
