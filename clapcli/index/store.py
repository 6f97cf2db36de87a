"""The SQLite store of an index: files, their segments, one float32 embedding per segment, and meta.

Layout of an index directory:

    index.sqlite          this store (WAL mode; -wal/-shm files appear beside it while open)
    vectors.hnsw[.json]   the hnswlib file and its sidecar, derived from this store (see ann.py)
    writer.lock[.pid]     the one-writer lock (see lock.py)
    vectors.hnsw.lock     held while the hnswlib file is written (see lock.py)

The store remembers the folders the index was built from (`roots`), so a later `clap index` with no folder
refreshes them and `--rebuild` must cover them all.

Crash safety comes from SQLite (the connection is set up in schema.py): WAL journal,
`synchronous=NORMAL` and foreign keys with `ON DELETE CASCADE`, so deleting a file row removes its
segments and their embeddings in the same transaction. The indexer groups many files in one
`transaction()`; whatever was not committed when the process died is simply absent on the next open.

Ids: `segments.id` is `INTEGER PRIMARY KEY AUTOINCREMENT`, so a segment id is never reused, even after
its row is deleted; the embedding of a segment is keyed by the same id, and the hnswlib label of a
vector is that id too. A deleted segment therefore maps to exactly one `mark_deleted(label)`, and a
label coming back from the hnswlib file can always be checked against the store. `meta.generation` is
incremented by every write that adds or removes segments, so the hnswlib sidecar can tell cheaply
whether it is current, and `meta.index_uuid` is new with every database (`--rebuild` fills a fresh one), so
an hnswlib file from an earlier life of the directory is never reused.

The rows as Python values (file records, segment rows, vectors as float32 blobs) live in rows.py; the
schema and its numbered migrations in schema.py: an older store is migrated when opened, a
newer one refused with a message saying what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..errors import DATA_FAILURE, FAILURE_KINDS, IndexStoreError
from ..identity import same_model
from .rows import (VECTOR_DTYPE, Counts, FileRecord, Segment, SegmentRow, concat_vectors, decode_vectors,
                   encode_segments)
from .schema import BUSY_TIMEOUT_S, DB_FILENAME, open_database

_IN_CHUNK = 900  # ids per `IN (...)` list, below SQLite's oldest variable limit (999)
_FILE_COLUMNS = ("id, path, size, mtime_ns, content_hash, duration, sample_rate, channels, status, error, indexed_at, "
                 "error_kind")


def content_hash(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """BLAKE2b-128 of the file's bytes, as 32 hex digits.

    BLAKE2b is in the standard library, runs at roughly 1 GB/s per core (well above disk speed for a
    sound library) and is collision-resistant, so an equal hash means an unchanged file. The indexer
    only hashes when size or mtime changed, so a touched-but-identical file is not re-embedded. The file
    is streamed in 1 MiB blocks through one reusable buffer.
    """
    digest = hashlib.blake2b(digest_size=16)
    buffer = bytearray(block_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# The store


# Precisions whose vectors leave fp32 and move with their batch mates (measured: benchmarks/RESULTS.md), so an
# index holding them may not equal a clean rebuild after a resumed or incremental run.
LOSSY_PRECISIONS = ("bf16", "fp16", "int8")


class IndexStore:
    """The SQLite part of an index. Open with `IndexStore.open(dir)`; use as a context manager to close.

    Every write method can be called alone (it then commits at once) or inside `transaction()`, which
    commits all writes of the block together or none of them. A single write (one `upsert_file`, one
    `record_error`, one `remove_files`) is atomic on its own too: if it raises, none of its rows stay,
    and the enclosing transaction can go on.
    """

    def __init__(self, conn: sqlite3.Connection, index_dir: Path, readonly: bool):
        self._conn = conn
        self.index_dir = index_dir
        self.readonly = readonly
        self._tx_kind: str | None = None  # None, 'read' (snapshot) or 'write' (transaction)
        self._savepoints = 0

    # -- opening ------------------------------------------------------------------------------------------

    @staticmethod
    def exists(index_dir: str | os.PathLike) -> bool:
        return (Path(index_dir) / DB_FILENAME).is_file()

    @classmethod
    def open(cls, index_dir: str | os.PathLike, create: bool = False, readonly: bool = False) -> "IndexStore":
        """Open the index in `index_dir`, migrating an older schema; `create=True` makes a new one.

        Raises IndexStoreError when there is no index (and `create` is False), when the file is not a
        clap index, or when its schema is newer than this version of clap understands.
        """
        if create and readonly:
            raise ValueError("create=True needs a writable store")
        index_dir = Path(index_dir)
        conn = open_database(index_dir, create, readonly)
        return cls(conn, index_dir, readonly)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> "IndexStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- transactions ---------------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator["IndexStore"]:
        """All writes in the block commit together at its end, or roll back if it raises (any exception,
        KeyboardInterrupt included). Nested blocks are savepoints: an inner failure undoes only the inner
        block when the outer one catches it."""
        self._check_writable()
        if self._tx_kind == "read":
            raise RuntimeError("cannot write inside a read snapshot")
        if self._tx_kind == "write":
            self._savepoints += 1
            name = f"sp{self._savepoints}"
            self._conn.execute(f"SAVEPOINT {name}")
            try:
                yield self
            except BaseException:
                self._conn.execute(f"ROLLBACK TO {name}")
                self._conn.execute(f"RELEASE {name}")
                raise
            else:
                self._conn.execute(f"RELEASE {name}")
            finally:
                self._savepoints -= 1
            return
        self._execute_locked("BEGIN IMMEDIATE")
        self._tx_kind = "write"
        try:
            yield self
        except BaseException:
            self._tx_kind = None
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original exception is the one to report
            raise
        else:
            self._tx_kind = None
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def snapshot(self) -> Iterator["IndexStore"]:
        """Reads in the block all see one committed state of the store (a WAL read transaction); a
        concurrent writer neither blocks them nor shows through. Inside `transaction()` it is a no-op."""
        if self._tx_kind is not None:
            yield self
            return
        self._conn.execute("BEGIN")
        self._tx_kind = "read"
        try:
            yield self
        finally:
            self._tx_kind = None
            self._conn.execute("COMMIT")

    # -- meta -----------------------------------------------------------------------------------------------

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"meta values are strings, got {type(value).__name__}")
        with self.transaction():
            self._conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    @property
    def index_uuid(self) -> str:
        """Identifies this store's life: it changes when the store is cleared, never otherwise."""
        return self.get_meta("index_uuid", "")

    @property
    def generation(self) -> int:
        """Incremented by every write that adds or removes segments (hence embeddings)."""
        return int(self.get_meta("generation", "0"))

    @property
    def dim(self) -> int | None:
        """The embedding dimension, once the model identity is set or the first vector stored."""
        value = self.get_meta("dim")
        return None if value is None else int(value)

    @property
    def model_identity(self) -> dict | None:
        value = self.get_meta("model_identity")
        return None if value is None else json.loads(value)

    def set_model_identity(self, identity: dict) -> None:
        """Record which model (name, weights hash, front-end settings, dim) the embeddings come from.

        `identity` is any JSON-serialisable dict; its "model" (or "name") entry is the name shown in
        messages and its "dim" entry, if present, fixes `dim`. Replacing a different identity is refused
        while the store holds embeddings (`--rebuild` fills a fresh store instead).
        """
        canonical = _canonical_identity(identity)
        with self.transaction():
            if self.counts().embeddings:
                self.check_model_identity(identity)
            dim = identity.get("dim")
            if dim is not None:
                dim = int(dim)
                stored_dim = self.dim
                if stored_dim is not None and stored_dim != dim and self.counts().embeddings:
                    raise IndexStoreError(
                        f"index {self.index_dir} holds {stored_dim}-dimensional embeddings, "
                        f"the model gives {dim}; pass the same --model or --rebuild"
                    )
                self.set_meta("dim", str(dim))
            self.set_meta("model_identity", canonical)

    @property
    def precisions(self) -> list[str]:
        """The precisions the stored embeddings were computed at (fp32, bf16, int8), sorted; [] when not
        recorded (an index built before this was). Not part of the model identity: the same weights at
        another precision give comparable embeddings (int8 within cosine 0.995 of fp32)."""
        value = self.get_meta("precision")
        return sorted(value.split(",")) if value else []

    def record_precision(self, precision: str) -> None:
        """Add `precision` to `precisions` (an index topped up at another precision lists both)."""
        self.set_meta("precision", ",".join(sorted(set(self.precisions) | {precision})))

    def check_model_identity(self, identity: dict, advice: str = "pass the same --model or --rebuild") -> None:
        """Raise IndexStoreError if the index was built with a different model identity; `advice` ends the
        message (what the calling command offers to fix it).

        An index without an identity yet accepts any (the caller then calls `set_model_identity`).
        """
        stored = self.model_identity
        if stored is None:
            return
        wanted = json.loads(_canonical_identity(identity))
        # The name is how to load the model again, not what it is: the same weights and front end under
        # another name (a moved directory, a local copy of a hub model) are the same model.
        if same_model(stored, wanted):
            return
        differing = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        built_with = _identity_name(stored)
        asked_for = _identity_name(wanted)
        detail = f", not {asked_for}" if asked_for != built_with else f" (different {', '.join(differing)})"
        raise IndexStoreError(
            f"index {self.index_dir} was built with model {built_with}{detail}; {advice}"
        )

    # -- roots ----------------------------------------------------------------------------------------------

    def roots(self) -> list[str]:
        """The folders (or files) the index was built from: absolute, resolved, sorted."""
        return [row[0] for row in self._conn.execute("SELECT path FROM roots ORDER BY path")]

    def add_roots(self, paths: Iterable[str | os.PathLike]) -> None:
        """Remember these folders (absolute, resolved paths). One inside a remembered folder adds nothing;
        remembered folders inside a new one give way to it."""
        with self.transaction():
            for path in map(os.fspath, paths):
                known = self.roots()
                if any(_within(path, root) for root in known):
                    continue
                self._conn.executemany("DELETE FROM roots WHERE path = ?", [(r,) for r in known if _within(r, path)])
                self._conn.execute("INSERT INTO roots (path, added_at) VALUES (?, ?)", (path, time.time()))

    def forget_roots(self, paths: Iterable[str | os.PathLike]) -> None:
        """Stop remembering these folders (their files are the caller's to remove)."""
        with self.transaction():
            self._conn.executemany("DELETE FROM roots WHERE path = ?", [(os.fspath(p),) for p in paths])

    # -- files ----------------------------------------------------------------------------------------------

    def file_states(self) -> dict[str, FileRecord]:
        """Every file row, keyed by path (one query, for comparing a whole scan against the store)."""
        rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files")
        return {row[1]: FileRecord(*row) for row in rows}

    def file_record(self, path: str | os.PathLike | None = None, *, file_id: int | None = None) -> FileRecord | None:
        """One file row, by its stored path or by its id (None when there is no such row)."""
        column, value = ("path", os.fspath(path)) if file_id is None else ("id", int(file_id))
        row = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE {column} = ?", (value,)).fetchone()
        return None if row is None else FileRecord(*row)

    def partial_files(self) -> list[FileRecord]:
        """The files embedded from the part that decodes, with the reasons, sorted by path."""
        rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE status = 'partial' ORDER BY path")
        return [FileRecord(*row) for row in rows]

    def error_files(self) -> list[FileRecord]:
        """The files that were skipped, with their reasons, sorted by path."""
        rows = self._conn.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE status = 'error' ORDER BY path")
        return [FileRecord(*row) for row in rows]

    def upsert_file(
        self,
        path: str | os.PathLike,
        size: int,
        mtime_ns: int,
        content_hash: str | None,
        duration: float,
        sample_rate: int,
        channels: int,
        segments: Sequence[Segment],
        partial: str | None = None,
    ) -> int:
        """Store a successfully embedded file, replacing any previous row and segments of that path.

        `partial` (the reason) records a file embedded from the part that decodes: status 'partial'.

        `segments` is a non-empty list of (start s, end s, kind, vector (D,)) with kind 'file' or
        'window'; vectors are stored as float32. Returns the file id (kept when the path was already
        stored). The old segments' ids disappear for good; the new ones are fresh ids.
        """
        self._check_writable()
        prepared = encode_segments(segments, self.dim, self.index_dir)
        path = os.fspath(path)
        with self.transaction():
            if self.dim is None:
                self.set_meta("dim", str(len(prepared[0][3]) // VECTOR_DTYPE.itemsize))
            file_id = self._write_file_row(
                path, size, mtime_ns, content_hash, duration, sample_rate, channels,
                "ok" if partial is None else "partial", partial,
            )
            self._conn.execute("DELETE FROM segments WHERE file_id = ?", (file_id,))
            for start, end, kind, blob in prepared:
                cursor = self._conn.execute(
                    'INSERT INTO segments (file_id, start, "end", kind) VALUES (?, ?, ?, ?)',
                    (file_id, start, end, kind),
                )
                self._conn.execute(
                    "INSERT INTO embeddings (segment_id, vector) VALUES (?, ?)", (cursor.lastrowid, blob)
                )
            self._bump_generation()
        return file_id

    def record_error(
        self,
        path: str | os.PathLike,
        size: int,
        mtime_ns: int,
        content_hash: str | None,
        error: str,
        kind: str = DATA_FAILURE,
    ) -> int:
        """Store a file that could not be indexed, with the reason and the failure's `kind` (errors.FAILURE_KINDS);
        drops any previous segments of it (the indexer keeps a file's previous embeddings by not calling this).

        The next run skips an unchanged error file (same size and mtime) of kind 'data' like any other file,
        and tries one of kind 'environment' again. Returns the file id.
        """
        self._check_writable()
        if kind not in FAILURE_KINDS:
            raise ValueError(f"failure kind must be one of {FAILURE_KINDS}, got {kind!r}")
        path = os.fspath(path)
        with self.transaction():
            file_id = self._write_file_row(path, size, mtime_ns, content_hash, None, None, None, "error", str(error),
                                           kind)
            deleted = self._conn.execute("DELETE FROM segments WHERE file_id = ?", (file_id,)).rowcount
            if deleted:
                self._bump_generation()
        return file_id

    def update_file_stat(self, path: str | os.PathLike, size: int, mtime_ns: int) -> bool:
        """Record a new size/mtime for a file whose content hash showed it unchanged (e.g. touched).

        Returns False if the path is not stored. Segments and embeddings are kept as they are.
        """
        self._check_writable()
        with self.transaction():
            cursor = self._conn.execute(
                "UPDATE files SET size = ?, mtime_ns = ? WHERE path = ?", (int(size), int(mtime_ns), os.fspath(path))
            )
        return cursor.rowcount > 0

    def remove_files(self, paths: Iterable[str | os.PathLike]) -> int:
        """Delete these paths with their segments and embeddings; unknown paths are ignored.

        Returns the number of file rows removed.
        """
        self._check_writable()
        paths = [os.fspath(p) for p in paths]
        removed = 0
        with self.transaction():
            for chunk in _chunks(paths, _IN_CHUNK):
                marks = ",".join("?" * len(chunk))
                removed += self._conn.execute(f"DELETE FROM files WHERE path IN ({marks})", chunk).rowcount
            if removed:
                self._bump_generation()
        return removed

    # -- vectors and segments -----------------------------------------------------------------------------

    def iter_vectors(self, after_id: int = 0, chunk_size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Embeddings with segment id > `after_id`, in id order, as chunks (ids (n,) int64, vectors (n, D)
        float32). One SELECT, so all chunks come from one committed state even without `snapshot()`."""
        dim = self.dim
        cursor = self._conn.execute(
            "SELECT segment_id, vector FROM embeddings WHERE segment_id > ? ORDER BY segment_id", (int(after_id),)
        )
        try:
            while True:
                rows = cursor.fetchmany(chunk_size)
                if not rows:
                    return
                yield decode_vectors(rows, dim, self.index_dir)
        finally:
            cursor.close()

    def vectors(self, after_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """All embeddings with segment id > `after_id`: (ids (N,) int64 ascending, vectors (N, D) float32)."""
        return concat_vectors(self.iter_vectors(after_id), self.dim)

    def vectors_by_id(self, ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
        """The embeddings of these segment ids (missing ids are left out), in ascending id order."""
        wanted = sorted({int(i) for i in ids})
        dim = self.dim
        chunks = []
        for chunk in _chunks(wanted, _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"SELECT segment_id, vector FROM embeddings WHERE segment_id IN ({marks}) ORDER BY segment_id", chunk
            ).fetchall()
            if rows:
                chunks.append(decode_vectors(rows, dim, self.index_dir))
        return concat_vectors(chunks, self.dim)

    def segment_ids(self) -> np.ndarray:
        """The ids of all segments that have an embedding, ascending, int64 (N,)."""
        rows = self._conn.execute("SELECT segment_id FROM embeddings ORDER BY segment_id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def segment_rows(self, ids: Iterable[int]) -> list[SegmentRow]:
        """The segments with these ids joined with their files, in the order of `ids`.

        Ids that are not (or no longer) in the store are left out: search uses this to drop hits from an
        hnswlib file that lags behind the store.
        """
        ids = [int(i) for i in ids]
        found: dict[int, SegmentRow] = {}
        for chunk in _chunks(sorted(set(ids)), _IN_CHUNK):
            marks = ",".join("?" * len(chunk))
            rows = self._conn.execute(
                f"""SELECT s.id, f.path, s.start, s."end", s.kind, f.duration
                    FROM segments s JOIN files f ON f.id = s.file_id
                    WHERE s.id IN ({marks})""",
                chunk,
            )
            for row in rows:
                found[row[0]] = SegmentRow(*row)
        return [found[i] for i in ids if i in found]

    def file_segments(self, path: str | os.PathLike) -> list[SegmentRow]:
        """The segments of one file, by start time."""
        rows = self._conn.execute(
            """SELECT s.id, f.path, s.start, s."end", s.kind, f.duration
               FROM segments s JOIN files f ON f.id = s.file_id
               WHERE f.path = ? ORDER BY s.start, s.id""",
            (os.fspath(path),),
        )
        return [SegmentRow(*row) for row in rows]

    # -- counts ---------------------------------------------------------------------------------------------

    def counts(self) -> Counts:
        files, ok, errors = self._conn.execute(
            "SELECT count(*), coalesce(sum(status IN ('ok', 'partial')), 0), coalesce(sum(status = 'error'), 0) "
            "FROM files"
        ).fetchone()
        segments = self._conn.execute("SELECT count(*) FROM segments").fetchone()[0]
        embeddings = self._conn.execute("SELECT count(*) FROM embeddings").fetchone()[0]
        return Counts(files, ok, errors, segments, embeddings)

    def checkpoint(self) -> None:
        """Move everything from the WAL into the database file and empty the WAL (before the file is moved)."""
        self._check_writable()
        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # -- internals ------------------------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.readonly:
            raise IndexStoreError(f"index {self.index_dir} was opened read-only")

    def _execute_locked(self, sql: str) -> None:
        try:
            self._conn.execute(sql)
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise IndexStoreError(
                    f"index {self.index_dir} is locked by another writer (waited {BUSY_TIMEOUT_S:g} s)"
                ) from e
            raise

    def _bump_generation(self) -> None:
        self._conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
        self._conn.execute("UPDATE meta SET value = ? WHERE key = 'updated_at'", (repr(time.time()),))

    def _write_file_row(
        self, path, size, mtime_ns, content_hash, duration, sample_rate, channels, status, error, error_kind=None
    ) -> int:
        values = (
            int(size),
            int(mtime_ns),
            content_hash,
            None if duration is None else float(duration),
            None if sample_rate is None else int(sample_rate),
            None if channels is None else int(channels),
            status,
            error,
            time.time(),
            error_kind,
        )
        row = self._conn.execute("SELECT id FROM files WHERE path = ?", (path,)).fetchone()
        if row is None:
            cursor = self._conn.execute(
                "INSERT INTO files (size, mtime_ns, content_hash, duration, sample_rate, channels, status, "
                "error, indexed_at, error_kind, path) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values + (path,),
            )
            return cursor.lastrowid
        self._conn.execute(
            "UPDATE files SET size = ?, mtime_ns = ?, content_hash = ?, duration = ?, sample_rate = ?, "
            "channels = ?, status = ?, error = ?, indexed_at = ?, error_kind = ? WHERE id = ?",
            values + (row[0],),
        )
        return row[0]


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _canonical_identity(identity: dict) -> str:
    if not isinstance(identity, dict):
        raise TypeError("a model identity is a dict")
    try:
        return json.dumps(identity, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise TypeError(f"a model identity must be JSON-serialisable: {e}") from e


def _identity_name(identity: dict) -> str:
    return str(identity.get("model") or identity.get("name") or "<unnamed>")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _chunks(items: Sequence, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])
