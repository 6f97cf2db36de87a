"""The index storage layer: SQLite store, hnswlib file, index paths and the writer lock.

Random float32 vectors stand in for embeddings; no model is needed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clapcli.errors import IndexStoreError
from clapcli.home import clap_home
from clapcli.index import ann as ann_mod
from clapcli.index import schema as schema_mod
from clapcli.index.ann import ANN_FILENAME, SIDECAR_FILENAME, AnnIndex, write_json_atomic
from clapcli.index.lock import GraphLock, WriterLock
from clapcli.index.paths import resolve_index
from clapcli.index.schema import DB_FILENAME
from clapcli.index.store import IndexStore, content_hash

DIM = 16


@pytest.fixture
def index_dir(tmp_path) -> Path:
    return tmp_path / "idx"


@pytest.fixture
def store(index_dir):
    with IndexStore.open(index_dir, create=True) as s:
        yield s


def _segments(rng, n_windows: int = 0, dim: int = DIM):
    segments = [(0.0, 10.0 * max(n_windows, 1), "file", rng.standard_normal(dim).astype(np.float32))]
    for w in range(n_windows):
        segments.append((10.0 * w, 10.0 * (w + 1), "window", rng.standard_normal(dim).astype(np.float32)))
    return segments


def _add(store, path, rng, n_windows=0, size=100, mtime_ns=1):
    segments = _segments(rng, n_windows)
    store.upsert_file(path, size, mtime_ns, f"hash-{path}", 10.0 * max(n_windows, 1), 48000, 2, segments)
    return segments


# Oracles read the database with SQL of their own, not with the store's methods under test.


def schema_version(store) -> int:
    return int(store._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


def file_state(store, path):
    return store.file_states().get(path)


def max_segment_id(store) -> int:
    """The largest segment id ever handed out, deleted ones included (SQLite's AUTOINCREMENT counter)."""
    row = store._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'segments'").fetchone()
    return 0 if row is None else int(row[0])


def integrity_problems(store) -> list[str]:
    """Everything wrong with the store, as sentences; empty when it is consistent: SQLite's own integrity
    and foreign-key checks, plus the store's rules (every segment has an embedding and vice versa, ok files
    have segments, error files none, every vector has `dim` float32 values)."""
    conn = store._conn
    problems = [f"integrity_check: {m}" for (m,) in conn.execute("PRAGMA integrity_check") if m != "ok"]
    problems += [f"foreign key violation: {row}" for row in conn.execute("PRAGMA foreign_key_check")]
    checks = {
        "segments without an embedding": "SELECT count(*) FROM segments s LEFT JOIN embeddings e "
        "ON e.segment_id = s.id WHERE e.segment_id IS NULL",
        "embeddings without a segment": "SELECT count(*) FROM embeddings e LEFT JOIN segments s "
        "ON s.id = e.segment_id WHERE s.id IS NULL",
        "ok files without segments": "SELECT count(*) FROM files f WHERE f.status = 'ok' "
        "AND NOT EXISTS (SELECT 1 FROM segments s WHERE s.file_id = f.id)",
        "error files with segments": "SELECT count(*) FROM files f WHERE f.status = 'error' "
        "AND EXISTS (SELECT 1 FROM segments s WHERE s.file_id = f.id)",
        "embeddings of the wrong size": "SELECT count(*) FROM embeddings WHERE length(vector) != 4 * "
        "(SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'dim')",
    }
    for what, sql in checks.items():
        n = conn.execute(sql).fetchone()[0]
        if n:
            problems.append(f"{n} {what}")
    return problems


def _brute_force(store, queries, k):
    ids, vectors = store.vectors()
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ vectors.T  # (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return ids[order], np.take_along_axis(scores, order, axis=1)


# ---------------------------------------------------------------------------------------------------------
# Schema, opening, migrations


def test_create_sets_up_wal_schema_and_meta(store, index_dir):
    assert (index_dir / DB_FILENAME).is_file()
    assert schema_version(store) == len(schema_mod.MIGRATIONS)
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert store.generation == 0 and len(store.index_uuid) == 32
    assert store.dim is None and store.model_identity is None
    assert store.counts() == (0, 0, 0, 0, 0)


def test_reopen_keeps_data_and_identity(index_dir):
    rng = np.random.default_rng(0)
    with IndexStore.open(index_dir, create=True) as s:
        _add(s, "/lib/a.wav", rng, n_windows=2)
        uuid, generation = s.index_uuid, s.generation
    with IndexStore.open(index_dir) as s:
        assert s.index_uuid == uuid and s.generation == generation
        assert sorted(s.file_states()) == ["/lib/a.wav"] and s.counts().embeddings == 3 and s.dim == DIM


def test_open_without_index_says_how_to_build_one(index_dir):
    with pytest.raises(IndexStoreError, match=r"no index at .*clap index"):
        IndexStore.open(index_dir)
    assert not index_dir.exists()
    with pytest.raises(IndexStoreError, match="no index"):
        IndexStore.open(index_dir, readonly=True)


def test_foreign_file_is_not_an_index(index_dir):
    index_dir.mkdir()
    (index_dir / DB_FILENAME).write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(IndexStoreError, match="not a clap index"):
        IndexStore.open(index_dir)
    (index_dir / DB_FILENAME).unlink()
    sqlite3.connect(index_dir / DB_FILENAME).execute("CREATE TABLE other (x)").connection.commit()
    with pytest.raises(IndexStoreError, match="not a clap index"):
        IndexStore.open(index_dir)


def test_newer_schema_is_refused_with_what_to_do(store, index_dir):
    store.set_meta("schema_version", "99")
    store.close()
    for readonly in (False, True):
        with pytest.raises(IndexStoreError, match=r"schema version 99, newer .*upgrade clapcli.*--rebuild"):
            IndexStore.open(index_dir, readonly=readonly)


@pytest.mark.parametrize("readonly", [False, True])
def test_older_schema_is_migrated_on_open(index_dir, monkeypatch, readonly):
    rng = np.random.default_rng(1)
    base = len(schema_mod.MIGRATIONS)
    with IndexStore.open(index_dir, create=True) as s:
        _add(s, "/lib/a.wav", rng)
        assert schema_version(s) == base

    def add_tags_table(conn):
        conn.execute("CREATE TABLE tags (file_id INTEGER REFERENCES files(id) ON DELETE CASCADE, tag TEXT)")
        conn.execute("INSERT INTO tags SELECT id, 'migrated' FROM files")

    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS + [add_tags_table])
    with IndexStore.open(index_dir, readonly=readonly) as s:
        assert schema_version(s) == base + 1
        assert s._conn.execute("SELECT tag FROM tags").fetchall() == [("migrated",)]
        assert sorted(s.file_states()) == ["/lib/a.wav"]
    with IndexStore.open(index_dir) as s:  # already migrated: not applied twice
        assert s._conn.execute("SELECT count(*) FROM tags").fetchone()[0] == 1
    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS[:base])
    with pytest.raises(IndexStoreError, match=f"schema version {base + 1}, newer"):
        IndexStore.open(index_dir)


def test_a_read_only_open_migrates_only_under_the_writer_lock(index_dir, monkeypatch):
    """`clap search` / `clap index list` on an older schema: the upgrade takes the writer lock, so it never
    runs beside a `clap index`; while one holds the lock, the read-only open is refused and nothing changes."""
    base = len(schema_mod.MIGRATIONS)
    with IndexStore.open(index_dir, create=True):
        pass
    held = []

    def add_tags_table(conn):
        held.append(_writer_lock_taken(index_dir))
        conn.execute("CREATE TABLE tags (x)")

    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS + [add_tags_table])
    with WriterLock(index_dir):  # a `clap index` of an older clap is writing it
        with pytest.raises(IndexStoreError, match=r"older schema and is being written by another `clap index` "
                           rf"\(pid {os.getpid()}\).*try again"):
            IndexStore.open(index_dir, readonly=True)
        version = sqlite3.connect(index_dir / DB_FILENAME).execute(
            "SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
        assert (int(version), held) == (base, [])  # nothing migrated
    with IndexStore.open(index_dir, readonly=True) as s:
        assert schema_version(s) == base + 1
    assert held == [True]  # the migration ran while the lock was held
    with WriterLock(index_dir, wait=False):  # and released after it
        pass


def _writer_lock_taken(index_dir) -> bool:
    try:
        WriterLock(index_dir, wait=False).acquire().release()
    except IndexStoreError:
        return True
    return False


def test_failed_migration_leaves_the_old_version(index_dir, monkeypatch):
    base = len(schema_mod.MIGRATIONS)
    with IndexStore.open(index_dir, create=True):
        pass

    def broken(conn):
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS + [broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        IndexStore.open(index_dir)
    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS[:base])
    with IndexStore.open(index_dir) as s:
        assert schema_version(s) == base
        assert s._conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'half_done'").fetchone()[0] == 0


# ---------------------------------------------------------------------------------------------------------
# Files, segments, embeddings


def test_upsert_stores_file_segments_and_vectors(store):
    rng = np.random.default_rng(2)
    segments = _add(store, "/lib/long.flac", rng, n_windows=3, size=1234, mtime_ns=99)
    row = file_state(store, "/lib/long.flac")
    assert (row.path, row.size, row.mtime_ns, row.status, row.error) == ("/lib/long.flac", 1234, 99, "ok", None)
    assert (row.duration, row.sample_rate, row.channels, row.content_hash) == (30.0, 48000, 2, "hash-/lib/long.flac")
    assert file_state(store, "/lib/other.wav") is None
    rows = store.file_segments("/lib/long.flac")
    assert [(r.start, r.end, r.kind) for r in rows] == [
        (0.0, 30.0, "file"), (0.0, 10.0, "window"), (10.0, 20.0, "window"), (20.0, 30.0, "window")
    ]
    ids, vectors = store.vectors()
    assert ids.dtype == np.int64 and vectors.dtype == np.float32 and vectors.shape == (4, DIM)
    np.testing.assert_array_equal(vectors, np.stack([s[3] for s in segments]))
    assert store.counts() == (1, 1, 0, 4, 4) and integrity_problems(store) == []


def test_replacing_a_file_swaps_its_segments_and_never_reuses_ids(store):
    rng = np.random.default_rng(3)
    _add(store, "/lib/a.wav", rng, n_windows=3)
    _add(store, "/lib/b.wav", rng)
    file_id = file_state(store, "/lib/a.wav").id
    old_ids = {r.segment_id for r in store.file_segments("/lib/a.wav")}
    new_segments = _add(store, "/lib/a.wav", rng, n_windows=0)
    assert file_state(store, "/lib/a.wav").id == file_id  # same row, updated
    new_rows = store.file_segments("/lib/a.wav")
    assert len(new_rows) == 1 and new_rows[0].segment_id > max(old_ids)
    assert store.vectors_by_id(old_ids)[0].size == 0  # old embeddings are gone with their segments
    np.testing.assert_array_equal(store.vectors_by_id([new_rows[0].segment_id])[1][0], new_segments[0][3])
    assert store.counts() == (2, 2, 0, 2, 2) and integrity_problems(store) == []

    before = max_segment_id(store)
    assert store.remove_files(["/lib/a.wav", "/lib/b.wav", "/lib/never-indexed.wav"]) == 2
    assert store.counts() == (0, 0, 0, 0, 0)
    _add(store, "/lib/a.wav", rng)
    assert store.segment_ids()[0] == before + 1  # AUTOINCREMENT: a removed id is never handed out again


def test_cascading_delete_leaves_no_orphans(store):
    rng = np.random.default_rng(4)
    for i in range(10):
        _add(store, f"/lib/{i}.wav", rng, n_windows=i % 3)
    store.remove_files([f"/lib/{i}.wav" for i in range(0, 10, 2)])
    c = store._conn
    orphans = "SELECT count(*) FROM embeddings WHERE segment_id NOT IN (SELECT id FROM segments)"
    assert c.execute(orphans).fetchone()[0] == 0
    assert c.execute("SELECT count(*) FROM segments WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0] == 0
    assert sorted(store.file_states()) == sorted(f"/lib/{i}.wav" for i in range(1, 10, 2))
    assert integrity_problems(store) == []


def test_record_error_replaces_previous_segments(store):
    rng = np.random.default_rng(5)
    _add(store, "/lib/a.wav", rng, n_windows=2)
    store.record_error("/lib/a.wav", 10, 5, "h", "not an audio file (unknown format)")
    row = file_state(store, "/lib/a.wav")
    assert (row.status, row.error, row.duration, row.size, row.mtime_ns) == (
        "error", "not an audio file (unknown format)", None, 10, 5
    )
    assert store.counts() == (1, 0, 1, 0, 0)
    assert [r.path for r in store.error_files()] == ["/lib/a.wav"]
    assert integrity_problems(store) == []


def test_update_file_stat_keeps_embeddings(store):
    rng = np.random.default_rng(6)
    _add(store, "/lib/a.wav", rng, size=10, mtime_ns=1)
    ids, generation = store.segment_ids(), store.generation
    assert store.update_file_stat("/lib/a.wav", 10, 2) is True
    assert store.update_file_stat("/lib/missing.wav", 1, 1) is False
    assert file_state(store, "/lib/a.wav").mtime_ns == 2
    np.testing.assert_array_equal(store.segment_ids(), ids)
    assert store.generation == generation  # no segment changed: the hnswlib file stays current


def test_generation_counts_segment_changes(store):
    rng = np.random.default_rng(7)
    g0 = store.generation
    _add(store, "/lib/a.wav", rng)
    g1 = store.generation
    store.record_error("/lib/b.wav", 1, 1, None, "bad")  # no segments removed
    assert g1 > g0 and store.generation == g1
    store.remove_files(["/lib/a.wav"])
    assert store.generation > g1


def test_bad_segments_are_rejected_before_anything_is_written(store):
    rng = np.random.default_rng(8)
    _add(store, "/lib/a.wav", rng)
    before = (store.counts(), store.generation)
    vec = rng.standard_normal(DIM).astype(np.float32)
    with pytest.raises(ValueError, match="at least one segment"):
        store.upsert_file("/lib/b.wav", 1, 1, None, 1.0, 48000, 1, [])
    with pytest.raises(ValueError, match="kind"):
        store.upsert_file("/lib/b.wav", 1, 1, None, 1.0, 48000, 1, [(0, 1, "clip", vec)])
    with pytest.raises(ValueError, match="NaN"):
        store.upsert_file("/lib/b.wav", 1, 1, None, 1.0, 48000, 1, [(0, 1, "file", vec * np.nan)])
    with pytest.raises(IndexStoreError, match="16-dimensional"):
        store.upsert_file("/lib/b.wav", 1, 1, None, 1.0, 48000, 1, [(0, 1, "file", vec[:8])])
    assert (store.counts(), store.generation) == before


def test_vectors_stream_in_chunks_and_segment_rows_follow_ids(store):
    rng = np.random.default_rng(9)
    for i in range(7):
        _add(store, f"/lib/{i}.wav", rng, n_windows=2)
    all_ids, all_vectors = store.vectors()
    chunks = list(store.iter_vectors(chunk_size=5))
    assert [len(c[0]) for c in chunks] == [5, 5, 5, 5, 1]
    np.testing.assert_array_equal(np.concatenate([c[0] for c in chunks]), all_ids)
    np.testing.assert_array_equal(np.concatenate([c[1] for c in chunks]), all_vectors)
    after = int(all_ids[10])
    np.testing.assert_array_equal(store.vectors(after_id=after)[0], all_ids[11:])
    assert store.vectors(after_id=int(all_ids[-1]))[1].shape == (0, DIM)

    wanted = [int(all_ids[4]), 10**9, int(all_ids[0])]
    rows = store.segment_rows(wanted)
    assert [r.segment_id for r in rows] == [wanted[0], wanted[2]]  # input order, unknown ids left out
    assert rows[1].path == "/lib/0.wav" and rows[1].kind == "file" and rows[1].duration == 20.0


# ---------------------------------------------------------------------------------------------------------
# Transactions and crash safety


def _snapshot(store):
    return sorted(store.file_states()), store.counts(), store.generation, store.segment_ids().tolist()


def test_failed_batch_rolls_back_to_the_previous_commit(store):
    rng = np.random.default_rng(10)
    _add(store, "/lib/keep.wav", rng, n_windows=1)
    before = _snapshot(store)
    with pytest.raises(RuntimeError, match="crash"):
        with store.transaction():
            _add(store, "/lib/new1.wav", rng)
            _add(store, "/lib/keep.wav", rng, n_windows=3)  # replacement of a committed file
            store.remove_files(["/lib/keep.wav"])
            _add(store, "/lib/new2.wav", rng)
            raise RuntimeError("crash in the middle of a batch")
    assert _snapshot(store) == before
    assert integrity_problems(store) == []


def test_keyboard_interrupt_rolls_back_too(store):
    rng = np.random.default_rng(11)
    before = _snapshot(store)
    with pytest.raises(KeyboardInterrupt):
        with store.transaction():
            _add(store, "/lib/a.wav", rng)
            raise KeyboardInterrupt
    assert _snapshot(store) == before
    with store.transaction():  # the connection is usable again
        _add(store, "/lib/a.wav", rng)
    assert sorted(store.file_states()) == ["/lib/a.wav"]


def test_a_failed_file_inside_a_batch_can_be_undone_alone(store):
    rng = np.random.default_rng(12)
    with store.transaction():
        _add(store, "/lib/a.wav", rng)
        with pytest.raises(RuntimeError):
            with store.transaction():  # a savepoint
                _add(store, "/lib/b.wav", rng)
                raise RuntimeError("decoder blew up after writing")
        _add(store, "/lib/c.wav", rng)
    assert sorted(store.file_states()) == ["/lib/a.wav", "/lib/c.wav"]
    assert integrity_problems(store) == []


def test_readers_see_the_last_commit_while_a_batch_is_open(store, index_dir):
    rng = np.random.default_rng(13)
    _add(store, "/lib/a.wav", rng)
    with IndexStore.open(index_dir, readonly=True) as reader:
        with pytest.raises(IndexStoreError, match="read-only"):
            reader.remove_files(["/lib/a.wav"])
        with store.transaction():
            _add(store, "/lib/b.wav", rng)
            store.remove_files(["/lib/a.wav"])
            assert sorted(reader.file_states()) == ["/lib/a.wav"]
            assert reader.counts().embeddings == 1
        assert sorted(reader.file_states()) == ["/lib/b.wav"]


_WRITER_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from clapcli.index.store import IndexStore

    store = IndexStore.open(sys.argv[1], create=True)
    rng = np.random.default_rng(int(sys.argv[2]))
    batch = int(store.get_meta("last_batch", "0"))
    while True:
        batch += 1
        with store.transaction():
            for i in range(20):
                n = 20 * batch + i
                windows = n % 4
                segments = [(0.0, 10.0, "file", rng.standard_normal(16))] + [
                    (10.0 * w, 10.0 * (w + 1), "window", rng.standard_normal(16)) for w in range(windows)
                ]
                # size = number of windows, mtime_ns = batch: lets the test check whole files and batches
                store.upsert_file(f"/lib/{n % 150}.wav", windows, batch, "h", 10.0, 48000, 1, segments)
            store.remove_files([f"/lib/{(20 * (batch - 3)) % 150}.wav"])
            store.set_meta("last_batch", str(batch))
        print(batch, flush=True)
    """
)


def test_sigkill_mid_batch_leaves_a_consistent_index(index_dir, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER_SCRIPT)
    for attempt, (min_batches, delay) in enumerate([(1, 0.0), (3, 0.013), (6, 0.031)]):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(index_dir), str(attempt)], stdout=subprocess.PIPE, text=True
        )
        try:
            for _ in range(min_batches):
                assert proc.stdout.readline(), "writer died early"
            time.sleep(delay)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        with IndexStore.open(index_dir) as s:
            assert integrity_problems(s) == []
            last = int(s.get_meta("last_batch"))
            assert last >= min_batches
            c = s._conn
            # the last committed batch is there whole, nothing of the killed one leaked in
            assert c.execute("SELECT count(*) FROM files WHERE mtime_ns = ?", (last,)).fetchone()[0] == 20
            assert c.execute("SELECT count(*) FROM files WHERE mtime_ns > ?", (last,)).fetchone()[0] == 0
            # every file has its one file-level segment and all of its windows
            bad = c.execute(
                """SELECT count(*) FROM files f WHERE
                   (SELECT count(*) FROM segments s WHERE s.file_id = f.id AND kind = 'window') != f.size
                   OR (SELECT count(*) FROM segments s WHERE s.file_id = f.id AND kind = 'file') != 1"""
            ).fetchone()[0]
            assert bad == 0
            ann = AnnIndex.sync(s, exact_below=0)
            assert ann.count == s.counts().embeddings
            ids, _ = ann.query(s.vectors()[1][:3], k=1)
            assert len(s.segment_rows(ids[:, 0])) == 3


def test_content_hash_is_blake2b_of_the_bytes(tmp_path):
    data = os.urandom(3 * (1 << 20) + 12345)  # spans several 1 MiB blocks
    path = tmp_path / "x.wav"
    path.write_bytes(data)
    assert content_hash(path) == hashlib.blake2b(data, digest_size=16).hexdigest()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert content_hash(path) != hashlib.blake2b(data, digest_size=16).hexdigest()
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    assert content_hash(empty) == hashlib.blake2b(b"", digest_size=16).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Model identity


IDENTITY = {"model": "laion/clap-htsat-fused", "weights_sha256": "abc", "frontend": {"fusion": True}, "dim": DIM}


def test_model_identity_roundtrip_and_mismatch_messages(store):
    rng = np.random.default_rng(14)
    store.check_model_identity(IDENTITY)  # a fresh index takes any model
    store.set_model_identity(IDENTITY)
    assert store.model_identity == IDENTITY and store.dim == DIM
    _add(store, "/lib/a.wav", rng)
    store.check_model_identity(dict(IDENTITY))
    store.check_model_identity(dict(IDENTITY, model="/copies/clap-htsat-fused"))  # same weights, other name
    other_model = dict(IDENTITY, model="laion/larger_clap_music", weights_sha256="b1g")
    with pytest.raises(IndexStoreError, match=r"built with model laion/clap-htsat-fused, not laion/larger_clap_music; "
                       r"pass the same --model or --rebuild"):
        store.check_model_identity(other_model)
    with pytest.raises(IndexStoreError, match=r"built with model laion/clap-htsat-fused \(different weights_sha256\)"):
        store.check_model_identity(dict(IDENTITY, weights_sha256="def"))
    with pytest.raises(IndexStoreError, match="--rebuild"):
        store.set_model_identity(other_model)  # refuses to mix models
    assert store.model_identity == IDENTITY


# ---------------------------------------------------------------------------------------------------------
# The hnswlib file


def _fill(store, rng, start, count, windows=2):
    for i in range(start, start + count):
        _add(store, f"/lib/{i:05d}.wav", rng, n_windows=i % (windows + 1))


def _assert_matches_brute_force(store, ann, rng, k=10, n_queries=20):
    queries = rng.standard_normal((n_queries, DIM)).astype(np.float32)
    ids, scores = ann.query(queries, k=k)
    want_ids, want_scores = _brute_force(store, queries, k)
    assert ids.shape == (n_queries, k) and ids.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(want_ids, axis=1))
    return ids


def test_small_stores_are_searched_exactly(store, index_dir):
    rng = np.random.default_rng(16)
    _fill(store, rng, 0, 50)
    ann = AnnIndex.sync(store)
    assert ann.action == "exact" and ann.count == store.counts().embeddings
    _assert_matches_brute_force(store, ann, rng)
    assert not (index_dir / ANN_FILENAME).exists()  # nothing written for a small store


@pytest.fixture
def built_hnsw(store):
    """A 200-file store with its hnswlib file built: (ann, rng)."""
    rng = np.random.default_rng(17)
    _fill(store, rng, 0, 200)
    return AnnIndex.sync(store, exact_below=0), rng


@pytest.fixture
def topped_up_hnsw(store, built_hnsw):
    """The built store after new, changed and removed files, synced again: (ann, rng, removed segment ids)."""
    _, rng = built_hnsw
    _fill(store, rng, 200, 60)  # new files
    _add(store, "/lib/00003.wav", rng, n_windows=1)  # a changed file: old ids deleted, new ids added
    removed_paths = [f"/lib/{i:05d}.wav" for i in range(10, 40)]
    removed_ids = {r.segment_id for p in removed_paths for r in store.file_segments(p)}
    store.remove_files(removed_paths)
    return AnnIndex.sync(store, exact_below=0), rng, removed_ids


def test_hnsw_build_persists_the_graph_with_a_sidecar_that_describes_the_store(store, index_dir, built_hnsw):
    ann, rng = built_hnsw
    assert (ann.action, ann.persisted) == ("rebuilt", True)
    assert (index_dir / ANN_FILENAME).is_file()
    sidecar = json.loads((index_dir / SIDECAR_FILENAME).read_text())
    assert sidecar["generation"] == store.generation and sidecar["index_uuid"] == store.index_uuid
    assert sidecar["max_segment_id"] == max_segment_id(store) and sidecar["live"] == ann.count
    assert sidecar["deleted"] == 0 and sidecar["file_size"] == (index_dir / ANN_FILENAME).stat().st_size
    _assert_matches_brute_force(store, ann, rng)


def test_hnsw_of_an_unchanged_store_is_loaded_not_rewritten(store, built_hnsw):
    again = AnnIndex.sync(store, exact_below=0)
    assert (again.action, again.persisted) == ("loaded", False)


def test_hnsw_top_up_adds_new_and_deletes_removed_segments(store, index_dir, topped_up_hnsw):
    ann, rng, removed_ids = topped_up_hnsw
    assert (ann.action, ann.persisted) == ("topped_up", True)
    assert ann.count == store.counts().embeddings
    sidecar = json.loads((index_dir / SIDECAR_FILENAME).read_text())
    assert sidecar["deleted"] >= len(removed_ids) and sidecar["count"] == sidecar["live"] + sidecar["deleted"]
    _assert_matches_brute_force(store, ann, rng)


def test_hnsw_deleted_ids_never_come_back_even_when_asking_for_everything(store, topped_up_hnsw):
    ann, rng, removed_ids = topped_up_hnsw
    ids, scores = ann.query(rng.standard_normal((5, DIM)).astype(np.float32), k=10**6)
    assert ids.shape == (5, ann.count)
    assert not set(ids.ravel().tolist()) & removed_ids
    assert set(ids[0].tolist()) == set(store.segment_ids().tolist())
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first


def test_hnsw_topped_up_graph_is_loaded_again_and_still_exact(store, topped_up_hnsw):
    _, rng, _ = topped_up_hnsw
    reloaded = AnnIndex.sync(store, exact_below=0)
    assert reloaded.action == "loaded"
    _assert_matches_brute_force(store, reloaded, rng)


def test_heavy_deletion_triggers_a_rebuild(store, index_dir):
    rng = np.random.default_rng(18)
    _fill(store, rng, 0, 100)
    AnnIndex.sync(store, exact_below=0)
    store.remove_files([f"/lib/{i:05d}.wav" for i in range(0, 50)])
    ann = AnnIndex.sync(store, exact_below=0)
    assert ann.action == "rebuilt"
    sidecar = json.loads((index_dir / SIDECAR_FILENAME).read_text())
    assert sidecar["deleted"] == 0 and sidecar["count"] == store.counts().embeddings
    _assert_matches_brute_force(store, ann, rng)


@pytest.mark.parametrize(
    "damage",
    ["missing", "garbage", "truncated", "sidecar_garbage", "sidecar_missing", "torn_pair"],
)
def test_missing_or_damaged_hnsw_file_is_rebuilt(store, index_dir, damage):
    rng = np.random.default_rng(19)
    _fill(store, rng, 0, 80)
    AnnIndex.sync(store, exact_below=0)
    path, sidecar = index_dir / ANN_FILENAME, index_dir / SIDECAR_FILENAME
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(os.urandom(path.stat().st_size))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "sidecar_garbage":
        sidecar.write_text("{not json")
    elif damage == "sidecar_missing":
        sidecar.unlink()
    elif damage == "torn_pair":  # a crash between replacing the file and replacing its sidecar
        old_sidecar = sidecar.read_text()
        _fill(store, rng, 80, 10)
        AnnIndex.sync(store, exact_below=0)
        sidecar.write_text(old_sidecar)
    ann = AnnIndex.sync(store, exact_below=0)
    assert ann.action == "rebuilt" and ann.persisted
    assert ann.count == store.counts().embeddings
    _assert_matches_brute_force(store, ann, rng)
    assert AnnIndex.sync(store, exact_below=0).action == "loaded"


def test_hnsw_file_of_another_database_is_not_reused(index_dir):
    """A fresh database in the directory (what a rebuild swaps in) is another life of the index: a graph
    file left beside it (a rebuild killed before removing the old one) is rebuilt, not loaded."""
    rng = np.random.default_rng(20)
    with IndexStore.open(index_dir, create=True) as store:
        _fill(store, rng, 0, 60)
        AnnIndex.sync(store, exact_below=0)
        old_uuid = store.index_uuid
    for suffix in ("", "-wal", "-shm"):
        (index_dir / (DB_FILENAME + suffix)).unlink(missing_ok=True)
    with IndexStore.open(index_dir, create=True) as store:
        assert store.index_uuid != old_uuid and (index_dir / ANN_FILENAME).is_file()
        _fill(store, rng, 0, 60)  # same paths, new ids
        ann = AnnIndex.sync(store, exact_below=0)
        assert ann.action == "rebuilt"
        _assert_matches_brute_force(store, ann, rng)


def test_reader_tops_up_in_memory_while_another_process_saves_the_graph(store, index_dir):
    rng = np.random.default_rng(21)
    _fill(store, rng, 0, 100)
    AnnIndex.sync(store, exact_below=0)
    stat_before = (index_dir / ANN_FILENAME).stat()
    graph_lock = GraphLock(index_dir)
    assert graph_lock.acquire()
    try:
        _fill(store, rng, 100, 20)
        store.remove_files(["/lib/00001.wav"])
        with IndexStore.open(index_dir, readonly=True) as reader:
            ann = AnnIndex.sync(reader, exact_below=0)
            assert (ann.action, ann.persisted) == ("topped_up", False)
            _assert_matches_brute_force(reader, ann, rng)
        stat_after = (index_dir / ANN_FILENAME).stat()
        assert (stat_after.st_mtime_ns, stat_after.st_size) == (stat_before.st_mtime_ns, stat_before.st_size)
    finally:
        graph_lock.release()
    with IndexStore.open(index_dir, readonly=True) as reader:
        ann = AnnIndex.sync(reader, exact_below=0)  # the lock is free now: the reader saves its work
        assert (ann.action, ann.persisted) == ("topped_up", True)
        assert AnnIndex.sync(reader, exact_below=0).action == "loaded"


def test_a_search_saving_the_graph_leaves_the_writer_lock_free(store, index_dir, monkeypatch):
    """A `clap index` started while a search saves its refreshed graph starts at once: the search holds the
    graph lock only, and the writer lock stays free (and `writer.lock.pid` does not name the search)."""
    rng = np.random.default_rng(26)
    _fill(store, rng, 0, 60)
    AnnIndex.sync(store, exact_below=0)
    _fill(store, rng, 60, 10)
    seen = []
    write_files = ann_mod._write_files

    def save_while_a_writer_starts(*args):
        with WriterLock(index_dir, wait=False):  # raised "being written by another `clap index`" before
            seen.append(not GraphLock(index_dir).acquire())  # while the search saves, the graph lock is taken
        write_files(*args)

    monkeypatch.setattr(ann_mod, "_write_files", save_while_a_writer_starts)
    with IndexStore.open(index_dir, readonly=True) as reader:
        ann = AnnIndex.sync(reader, exact_below=0)
    assert (ann.action, ann.persisted, seen) == ("topped_up", True, [True])
    assert not (index_dir / "writer.lock.pid").exists()


def test_a_writer_waits_for_a_saving_search_and_a_search_never_replaces_a_newer_graph(store, index_dir,
                                                                                      monkeypatch):
    rng = np.random.default_rng(27)
    _fill(store, rng, 0, 60)
    AnnIndex.sync(store, exact_below=0)
    graph_lock = GraphLock(index_dir)
    assert graph_lock.acquire()
    monkeypatch.setattr(ann_mod, "GRAPH_LOCK_WAIT_S", 0.2)
    _fill(store, rng, 60, 10)
    ann = AnnIndex.sync(store, exact_below=0, persist=True)  # a search still saving: the file is left to it
    assert (ann.action, ann.persisted) == ("topped_up", False)
    graph_lock.release()

    with IndexStore.open(index_dir, readonly=True) as reader:
        with reader.snapshot():  # a search syncing an older snapshot while `clap index` commits and saves
            old = reader.generation
            _fill(store, rng, 70, 10)
            AnnIndex.sync(store, exact_below=0, persist=True)
            ann = AnnIndex.sync(reader, exact_below=0)
            assert (ann.generation, ann.persisted) == (old, False)
    assert json.loads((index_dir / SIDECAR_FILENAME).read_text())["generation"] == store.generation


def test_hits_from_a_lagging_index_are_dropped_by_segment_rows(store):
    rng = np.random.default_rng(22)
    _fill(store, rng, 0, 30)
    ann = AnnIndex.sync(store, exact_below=0)
    gone = {r.segment_id for r in store.file_segments("/lib/00002.wav")}
    store.remove_files(["/lib/00002.wav"])
    ids, _ = ann.query(rng.standard_normal(DIM).astype(np.float32), k=ann.count)
    assert gone <= set(ids[0].tolist())  # the stale graph still has them...
    rows = store.segment_rows(ids[0])
    assert len(rows) == ann.count - len(gone) and not {r.segment_id for r in rows} & gone  # ...the store does not


@pytest.mark.parametrize("exact_below", [0, 10**6])
def test_query_shapes_and_k_larger_than_the_index(store, exact_below):
    rng = np.random.default_rng(23)
    empty = AnnIndex.sync(store, exact_below=exact_below)
    ids, scores = empty.query(np.ones(DIM, np.float32), k=5)
    assert ids.shape == (1, 0) and scores.shape == (1, 0)
    _fill(store, rng, 0, 3, windows=0)
    ann = AnnIndex.sync(store, exact_below=exact_below)
    ids, scores = ann.query(rng.standard_normal(DIM), k=50)  # (D,) float64 input is accepted
    assert ids.shape == (1, 3) and scores.shape == (1, 3)
    vector = store.vectors()[1][1]
    ids, scores = ann.query(vector * 3.0, k=1)  # cosine: scale does not matter
    assert ids[0, 0] == store.vectors()[0][1] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(IndexStoreError, match="dimensions"):
        ann.query(np.ones(DIM + 1, np.float32), k=1)


def test_query_falls_back_to_exact_when_the_graph_cannot_answer(store):
    rng = np.random.default_rng(25)
    _fill(store, rng, 0, 60)
    store.remove_files([f"/lib/{i:05d}.wav" for i in range(0, 60, 4)])
    ann = AnnIndex.sync(store, exact_below=0)

    class Unreachable:  # hnswlib raises this when deletions leave too few reachable neighbours
        def __init__(self, graph):
            self.graph = graph

        def __getattr__(self, name):
            return getattr(self.graph, name)

        def knn_query(self, *args, **kwargs):
            raise RuntimeError("Cannot return the results in a contiguous 2D array")

    ann._hnsw = Unreachable(ann._hnsw)
    _assert_matches_brute_force(store, ann, rng)


def test_write_json_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "vectors.hnsw.json"
    write_json_atomic(target, {"generation": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"generation": object()})  # fails half-way through writing
    assert json.loads(target.read_text()) == {"generation": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vectors.hnsw.json"]  # no temporary left behind


def test_persisting_leaves_no_temporary_files(store, index_dir):
    rng = np.random.default_rng(24)
    _fill(store, rng, 0, 40)
    AnnIndex.sync(store, exact_below=0, persist=True)
    names = sorted(p.name for p in index_dir.iterdir())
    assert ANN_FILENAME in names and SIDECAR_FILENAME in names
    assert not [n for n in names if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------
# Index locations and the writer lock


def test_resolve_index(tmp_path, monkeypatch):
    home = Path(os.environ["CLAP_HOME"])  # set by conftest's autouse fixture
    assert clap_home() == home
    assert resolve_index(None) == home / "indexes" / "default"
    assert resolve_index("drums") == home / "indexes" / "drums"
    monkeypatch.chdir(tmp_path)
    assert resolve_index("./drums") == tmp_path / "drums"
    assert resolve_index("sub/drums") == tmp_path / "sub" / "drums"
    assert resolve_index(".hidden") == tmp_path / ".hidden"
    assert resolve_index(str(tmp_path / "abs")) == tmp_path / "abs"
    assert resolve_index(Path("drums")) == tmp_path / "drums"  # a Path is always a path
    monkeypatch.delenv("CLAP_HOME")
    import platformdirs

    assert clap_home() == Path(platformdirs.user_data_dir("clap"))


_LOCK_HOLDER = textwrap.dedent(
    """
    import sys
    from clapcli.index.lock import WriterLock

    with WriterLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def test_writer_lock_refuses_a_second_writer_and_names_the_holder(index_dir, tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(_LOCK_HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(index_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(IndexStoreError, match=rf"being written by another `clap index` \(pid {proc.pid}\); "
                           r"wait for it or pass --wait"):
            WriterLock(index_dir, wait=False).acquire()

        acquired = threading.Event()

        def waiter():
            with WriterLock(index_dir, wait=True):
                acquired.set()

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert not acquired.is_set()  # still waiting for the holder
        proc.stdin.write("\n")
        proc.stdin.flush()
        thread.join(timeout=10)
        assert acquired.is_set()
    finally:
        proc.kill()
        proc.wait()


def test_writer_lock_in_one_process_and_after_a_killed_holder(index_dir, tmp_path):
    with WriterLock(index_dir) as held:
        assert held.held
        with pytest.raises(IndexStoreError, match=rf"pid {os.getpid()}"):
            WriterLock(index_dir).acquire()
        with pytest.raises(IndexStoreError, match="still being written"):
            WriterLock(index_dir, wait=True, timeout=0.2).acquire()
    with WriterLock(index_dir):  # released on exit
        pass

    script = tmp_path / "holder.py"
    script.write_text(_LOCK_HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(index_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    proc.kill()
    proc.wait()
    with WriterLock(index_dir):  # the OS released a SIGKILLed holder's lock
        pass


def test_filelock_releases_that_delete_the_lock_file_are_excluded():
    """filelock 3.20.4 to 3.29.4 unlink the lock file on release (tox-dev/filelock#574, fixed in 3.29.5 by #577):
    a writer waiting on the old file then locks it while a newcomer locks a new file of the same name."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    (pin,) = [Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "filelock"]
    for bad in ("3.20.4", "3.24.3", "3.29.4"):
        assert bad not in pin.specifier, bad
    assert "3.29.5" in pin.specifier and "4.3.2" in pin.specifier


def test_writer_lock_stays_exclusive_across_release_and_reacquire(index_dir):
    """A writer waiting for the lock must not get it while the holder, having released and taken it again,
    still holds it (what a lock file deleted on release, or while held, would allow)."""
    first = WriterLock(index_dir).acquire()
    got = threading.Event()
    waiter = WriterLock(index_dir, wait=True, timeout=10)

    def wait_for_it():
        waiter.acquire()
        got.set()

    thread = threading.Thread(target=wait_for_it)
    thread.start()
    time.sleep(0.3)  # the waiter is polling the lock file
    first.release()
    if not got.wait(5):
        pytest.fail("the waiter never got the released lock")
    with pytest.raises(IndexStoreError, match="being written"):
        WriterLock(index_dir).acquire()  # the waiter holds it now: no one else may
    assert (index_dir / "writer.lock").exists()
    waiter.release()
    thread.join(5)
    with WriterLock(index_dir):  # and the lock file is still the one everybody locks
        with pytest.raises(IndexStoreError):
            WriterLock(index_dir).acquire()


def test_rows_check_and_encode_vectors_without_a_database(tmp_path):
    """The row/vector seam of the store (index/rows.py): segments are checked and become float32 blobs, and
    the blobs read back as the vectors, with no SQLite involved."""
    from clapcli.index.rows import concat_vectors, decode_vectors, encode_segments

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((3, DIM)).astype(np.float64)
    encoded = encode_segments([(0.0, 3.0, "file", vecs[0]), (0.0, 1.0, "window", vecs[1]),
                               (1.0, 2.0, "window", vecs[2])], None, tmp_path)
    assert [e[:3] for e in encoded] == [(0.0, 3.0, "file"), (0.0, 1.0, "window"), (1.0, 2.0, "window")]
    ids, back = decode_vectors([(7 + i, blob) for i, (*_, blob) in enumerate(encoded)], DIM, tmp_path)
    assert ids.tolist() == [7, 8, 9] and back.dtype == np.float32
    np.testing.assert_array_equal(back, vecs.astype(np.float32))
    with pytest.raises(IndexStoreError, match="holds 16-dimensional"):
        encode_segments([(0.0, 1.0, "file", vecs[0][:8])], DIM, tmp_path)
    with pytest.raises(IndexStoreError, match="wrong size"):
        decode_vectors([(1, encoded[0][3][:-4])], DIM, tmp_path)
    with pytest.raises(ValueError, match="NaN"):
        encode_segments([(0.0, 1.0, "file", np.full(DIM, np.nan))], None, tmp_path)
    assert concat_vectors([], DIM)[1].shape == (0, DIM)


def test_the_store_and_the_indexer_stay_under_600_lines():
    """Issue 18: no module over 600 lines; the store keeps its SQL, rows.py its values."""
    import clapcli.index.indexer as indexer_mod
    import clapcli.index.store as store_mod

    for module in (store_mod, indexer_mod):
        lines = Path(module.__file__).read_text().count("\n")
        assert lines < 600, f"{module.__name__}: {lines} lines"
