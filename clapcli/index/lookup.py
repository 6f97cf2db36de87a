"""What the index already knows about one file: its row, whether the file on disk is still that file, and
its stored vectors (the file-level one and its windows), so that "more like this" needs no model.

Paths are looked up as the indexer stores them: absolute and resolved (symlinks followed).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .rows import FileRecord, SegmentRow
from .store import IndexStore


class StoredFile(NamedTuple):
    record: FileRecord
    vector: np.ndarray  # (D,) float32, the file-level embedding (L2-normalised as stored)
    windows: list[SegmentRow]  # the 10 s windows of a long file, by start ([] for short files)
    window_vectors: np.ndarray  # (len(windows), D) float32


def stored_path(path: str | os.PathLike) -> str:
    """A path as the indexer stores it: absolute, symlinks resolved."""
    return str(Path(path).expanduser().resolve())


def unchanged_on_disk(record: FileRecord) -> bool:
    """The file at the record's path still has the size and modification time it was indexed with."""
    try:
        st = os.stat(record.path)
    except OSError:
        return False
    return st.st_size == record.size and st.st_mtime_ns == record.mtime_ns


def stored_file(store: IndexStore, path: str | os.PathLike | None = None, *, file_id: int | None = None,
                require_unchanged: bool = True) -> StoredFile | None:
    """The stored vectors of an indexed file, by path (resolved as the indexer does) or by index id.

    None when the index has no searchable row for it, or (with `require_unchanged`) when the file on disk
    has changed since it was indexed: then the caller embeds it as any other file.
    """
    record = store.file_record(stored_path(path)) if file_id is None else store.file_record(file_id=file_id)
    if record is None or record.status not in ("ok", "partial"):
        return None
    if require_unchanged and not unchanged_on_disk(record):
        return None
    segments = store.file_segments(record.path)
    ids, vectors = store.vectors_by_id(s.segment_id for s in segments)
    by_id = {int(i): v for i, v in zip(ids.tolist(), vectors)}
    files = [s for s in segments if s.kind == "file" and s.segment_id in by_id]
    if not files:
        return None
    windows = [s for s in segments if s.kind == "window" and s.segment_id in by_id]
    dim = vectors.shape[1]
    window_vectors = (np.stack([by_id[s.segment_id] for s in windows]) if windows
                      else np.empty((0, dim), dtype=np.float32))
    return StoredFile(record, by_id[files[0].segment_id], windows, window_vectors)
