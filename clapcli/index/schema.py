"""The index database file: opening it, its schema version and the numbered migrations.

`open_database` gives `IndexStore` a connection to a store at the current schema: WAL journal,
`synchronous=NORMAL` (a committed transaction survives a killed process; a power cut may lose the last
commits but never corrupts the file) and foreign keys on, so deleting a file row cascades to its segments
and their embeddings.

Schema versions follow numbered migrations (as in llm's): `MIGRATIONS[i]` upgrades version i to i + 1,
version 0 being an empty database, and `meta.schema_version` records where a store stands. An older store
is migrated when opened, each step in its own transaction with its version bump, so a failed migration
leaves the previous version intact; a newer one is refused with a message saying what to do. A read-only
open of an older store (`clap search`, `clap index list`) migrates it through a short-lived writable
connection while holding the writer lock, taken without waiting; while a `clap index` holds it (and has not
migrated the store itself), the read-only open is refused with a message saying so.
"""

from __future__ import annotations

import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Callable

from ..errors import IndexStoreError

DB_FILENAME = "index.sqlite"
PARTITIONS_DIR = ".partitions"  # inside the index directory: one sub-directory per sharded (torchrun) run
BUSY_TIMEOUT_S = 30.0  # how long a write waits for another writer's transaction before giving up


def _migrate_to_1(conn: sqlite3.Connection) -> None:
    statements = [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            content_hash TEXT,
            duration REAL,
            sample_rate INTEGER,
            channels INTEGER,
            status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
            error TEXT,
            indexed_at REAL NOT NULL
        )""",
        """CREATE TABLE segments (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            start REAL NOT NULL,
            "end" REAL NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('file', 'window'))
        )""",
        "CREATE INDEX segments_file_id ON segments(file_id)",
        """CREATE TABLE embeddings (
            segment_id INTEGER PRIMARY KEY REFERENCES segments(id) ON DELETE CASCADE,
            vector BLOB NOT NULL
        )""",
    ]
    for statement in statements:
        conn.execute(statement)
    now = repr(time.time())
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("index_uuid", uuid.uuid4().hex), ("generation", "0"), ("created_at", now), ("updated_at", now)],
    )


def _migrate_to_2(conn: sqlite3.Connection) -> None:
    """files.status may be 'partial': a truncated file embedded from the part that decodes (reason in `error`).

    SQLite cannot alter a CHECK constraint, and rebuilding `files` inside the migration's transaction would
    cascade-delete every segment (foreign keys cannot be switched off inside a transaction). Widening a CHECK
    changes nothing stored, so the table's recorded SQL is edited in place, the documented procedure for such
    changes (sqlite.org/lang_altertable.html, "making other kinds of table schema changes")."""
    (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'files'").fetchone()
    old = "CHECK (status IN ('ok', 'error'))"
    if old not in sql:
        raise IndexStoreError(f"unexpected schema of the files table: {sql}")
    (version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("PRAGMA writable_schema = ON")
    try:
        conn.execute("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'files'",
                     (sql.replace(old, "CHECK (status IN ('ok', 'partial', 'error'))"),))
        conn.execute(f"PRAGMA schema_version = {int(version) + 1}")
    finally:
        conn.execute("PRAGMA writable_schema = OFF")


def _migrate_to_3(conn: sqlite3.Connection) -> None:
    """`roots`: the folders (or files) an index was built from, absolute and resolved, so that `clap index` with
    no folder refreshes them all and `--rebuild` covers them all. An older index starts with none and learns
    the folders of its next run."""
    conn.execute("CREATE TABLE roots (path TEXT PRIMARY KEY, added_at REAL NOT NULL)")


def _migrate_to_4(conn: sqlite3.Connection) -> None:
    """files.error_kind: what an error row's failure says about the file, 'data' (the file is bad: tried again
    once it changes) or 'environment' (no space, I/O, memory...: tried again on every run). Error rows stored
    before it have none, and are tried again once, on the next run, to learn their kind."""
    conn.execute("ALTER TABLE files ADD COLUMN error_kind TEXT CHECK (error_kind IN ('data', 'environment'))")


def _migrate_to_5(conn: sqlite3.Connection) -> None:
    """Reserved for the `moves` branch's migration (renames keep a file's row id); a no-op on the `tags` branch so
    that tags' migration is number 6. Whoever merges keeps moves' body here."""


def _migrate_to_6(conn: sqlite3.Connection) -> None:
    """Tags stored per file (`clap tag --index`, `clap search --tag`), and the norms a classifier head needs.

    `tag_sets`: one row per way of tagging (the model's fingerprint, zero-shot with a label set and templates, or a
    classifier head), with what tagging the next new file needs without any model of text: the label vectors and
    logit scale of a zero-shot set, the directory of a classifier. `file_tags`: a file's top labels in a set, best
    first (rank 1), gone with the file (`ON DELETE CASCADE`) and, by the trigger, whenever its file-level segment
    is replaced (a changed file is embedded again: `clap index` tags it again). It is a WITHOUT ROWID table
    clustered on its key, one b-tree less to write per tag (tagging 100,000 files writes half a million rows).

    `segments.norm`: the L2 norm of the raw projection output a stored (normalised) vector came from, so a head
    trained on raw projections reads `norm × vector` instead of the audio again; NULL where it was not recorded
    (rows stored before this, a sharded run's)."""
    statements = [
        """CREATE TABLE tag_sets (
            id INTEGER PRIMARY KEY,
            model TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('zero-shot', 'classifier')),
            name TEXT NOT NULL,
            labels_hash TEXT NOT NULL,
            templates TEXT NOT NULL,
            top_k INTEGER NOT NULL,
            labels TEXT NOT NULL,
            label_vectors BLOB,
            logit_scale REAL,
            classifier TEXT,
            created_at REAL NOT NULL,
            UNIQUE (model, kind, labels_hash, templates)
        )""",
        """CREATE TABLE file_tags (
            file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
            set_id INTEGER NOT NULL REFERENCES tag_sets(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            score REAL NOT NULL,
            rank INTEGER NOT NULL,
            PRIMARY KEY (file_id, set_id, rank)
        ) WITHOUT ROWID""",
        "CREATE INDEX file_tags_label ON file_tags(label, set_id)",
        """CREATE TRIGGER file_tags_follow_embedding AFTER DELETE ON segments WHEN OLD.kind = 'file'
           BEGIN DELETE FROM file_tags WHERE file_id = OLD.file_id; END""",
        "ALTER TABLE segments ADD COLUMN norm REAL",
    ]
    for statement in statements:
        conn.execute(statement)


# MIGRATIONS[i] upgrades a store at schema version i to version i + 1 (version 0 = an empty database).
# Append a function to change the schema; never edit a released one.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1, _migrate_to_2, _migrate_to_3, _migrate_to_4,
                                                          _migrate_to_5, _migrate_to_6]


def open_database(index_dir: Path, create: bool, readonly: bool) -> sqlite3.Connection:
    """A connection (autocommit mode) to the store in `index_dir`, migrated to the current schema.

    Raises IndexStoreError when there is no index (and `create` is False), when the file is not a clap
    index, or when its schema is newer than this version of clap understands.
    """
    db_path = index_dir / DB_FILENAME
    if not db_path.is_file():
        if not create:
            raise IndexStoreError(f"no index at {index_dir}; build one with `clap index DIR…`")
        try:
            index_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise IndexStoreError(f"cannot create index directory {index_dir}: {e.strerror or e}") from e
    conn = _connect(db_path, readonly)
    try:
        version = _read_schema_version(conn, db_path)
        target = len(MIGRATIONS)
        if version > target:
            raise IndexStoreError(
                f"index {index_dir} has schema version {version}, newer than this clap understands "
                f"({target}); upgrade clapcli, or rebuild the index with `clap index --rebuild`"
            )
        if version == 0 and not create:
            raise IndexStoreError(f"no index at {index_dir}; build one with `clap index DIR…`")
        if version < target:
            if readonly:
                _migrate_with_writer_connection(db_path, index_dir)
            else:
                _migrate(conn, db_path)
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(db_path: Path, readonly: bool) -> sqlite3.Connection:
    try:
        if readonly:
            return _connect_readonly(db_path)
        conn = sqlite3.connect(str(db_path), isolation_level=None, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as e:
        raise IndexStoreError(f"cannot open index database {db_path}: {e}") from e
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as e:
        conn.close()
        raise _not_an_index(db_path, str(e)) from e
    return conn


def _connect_readonly(db_path: Path) -> sqlite3.Connection:
    """A read-only connection, also where nothing can be written (a read-only mount, a shared library).

    `mode=ro` still needs the WAL index file (`-shm`) beside the database, which a reader cannot create in
    a read-only directory; the database is then opened `immutable`, read as it is on disk (a writer that
    closed cleanly has checkpointed everything into it)."""
    uri = db_path.resolve().as_uri()
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as e:
        conn.close()
        if os.access(db_path.parent, os.W_OK) and "unable to open" not in str(e) and "readonly" not in str(e):
            raise IndexStoreError(f"cannot read index database {db_path}: {e}") from e
    except sqlite3.DatabaseError as e:
        conn.close()
        raise _not_an_index(db_path, str(e)) from e
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S)


def _read_schema_version(conn: sqlite3.Connection, db_path: Path) -> int:
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "meta" not in tables:
            if tables:
                raise _not_an_index(db_path, "no meta table")
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise _not_an_index(db_path, str(e)) from e
    if row is None:
        # Version 1 stores written before the version key existed do not exist; a meta table without
        # the key means someone else's database.
        raise _not_an_index(db_path, "no schema version")
    return int(row[0])


def _not_an_index(db_path: Path, why: str) -> IndexStoreError:
    return IndexStoreError(
        f"{db_path} is not a clap index database ({why}); `clap index DIR… --index {db_path.parent} --rebuild` "
        f"builds a new index there, the damaged file kept aside as {DB_FILENAME}.damaged-<time>"
    )


def _migrate(conn: sqlite3.Connection, db_path: Path) -> None:
    """Apply the missing migrations, each in its own transaction with its version bump."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _read_schema_version(conn, db_path)  # re-read under the lock: another process may have
            # migrated it meanwhile
            if version >= len(MIGRATIONS):
                conn.execute("COMMIT")
                return
            MIGRATIONS[version](conn)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (str(version + 1),),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _migrate_with_writer_connection(db_path: Path, index_dir: Path) -> None:
    """A read-only open of an older store migrates it through a short-lived writable connection, holding the
    writer lock so that no `clap index` writes the store meanwhile."""
    from .lock import WriterLock, lock_holder

    lock = WriterLock(index_dir, wait=False, holder="a read-only command upgrading the index schema")
    try:
        lock.acquire()
    except IndexStoreError as e:
        if not os.access(index_dir, os.W_OK):
            raise IndexStoreError(f"index {index_dir} uses an older schema and could not be upgraded ({e}); "
                                  "run `clap index` on it with write access") from None
        if _current_version(db_path) >= len(MIGRATIONS):
            return  # the `clap index` holding the lock has migrated it
        pid, what = lock_holder(index_dir)
        raise IndexStoreError(
            f"index {index_dir} uses an older schema and is being written by {what} "
            f"(pid {pid if pid is not None else 'unknown'}), which upgrades it; try again when that is done"
        ) from None
    try:
        conn = _connect(db_path, readonly=False)
        try:
            _migrate(conn, db_path)
        finally:
            conn.close()
    except (sqlite3.Error, OSError) as e:
        raise IndexStoreError(
            f"index {index_dir} uses an older schema and could not be upgraded ({e}); "
            "run `clap index` on it with write access"
        ) from e
    finally:
        lock.release()


def _current_version(db_path: Path) -> int:
    conn = _connect_readonly(db_path)
    try:
        return _read_schema_version(conn, db_path)
    finally:
        conn.close()
