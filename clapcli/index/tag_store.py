"""The SQL of tags stored in an index (`tag_sets`, `file_tags`; schema migration 6) and of the vector norms
that a classifier head reads (`segments.norm`).

A tag set is one way of tagging the files of an index, keyed by the model's fingerprint, the kind ('zero-shot'
or 'classifier'), the labels' content hash and the templates. A zero-shot set keeps its label vectors and the
model's logit scale, so tagging a new file needs no text model; a classifier set keeps the head's directory.
`file_tags` holds each file's top labels per set, best first (rank 1); a file's tags go with its row, and with
its file-level segment (the trigger of migration 6), so a changed file that `clap index` embeds again has none
until it is tagged again. Renames that keep a file's row id keep its tags.

What is computed lives in `clapcli.library.tags`; this module only reads and writes rows.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import UsageError
from .rows import VECTOR_DTYPE, decode_vectors
from .store import IndexStore

TAG_SET_KINDS = ("zero-shot", "classifier")
_IN_CHUNK = 900  # ids per `IN (...)` list, below SQLite's oldest variable limit (999)
_SET_COLUMNS = ("id, model, kind, name, labels_hash, templates, top_k, labels, label_vectors, logit_scale, classifier, "
                "created_at")


@dataclass(frozen=True)
class TagSet:
    """One row of `tag_sets`."""

    id: int
    model: str  # fingerprint of the model whose vectors were tagged (clapcli.identity)
    kind: str  # 'zero-shot' or 'classifier'
    name: str  # the label set's name (esc50, custom, a label file's stem) or the classifier directory's name
    labels_hash: str  # sha256 of the labels in order
    templates: list[str]  # zero-shot prompt templates ([] for a classifier)
    top_k: int  # labels stored per file
    labels: list[str]
    label_vectors: np.ndarray | None  # zero-shot: (L, D) ensembled label embeddings
    logit_scale: float | None  # zero-shot: the model's logit scale
    classifier: str | None  # classifier: its directory, absolute
    created_at: float  # unix time

    def to_dict(self) -> dict:
        """`clap index list --json`'s description of a set (no vectors)."""
        return {"id": self.id, "kind": self.kind, "name": self.name, "labels": len(self.labels),
                "templates": self.templates, "top_k": self.top_k, "classifier": self.classifier}


def _conn(store: IndexStore) -> sqlite3.Connection:
    return store._conn  # the tag tables are the store's own; this module is their SQL


def tag_sets(store: IndexStore) -> list[TagSet]:
    """Every tag set of the index, oldest first ([] for an index without tags)."""
    rows = _conn(store).execute(f"SELECT {_SET_COLUMNS} FROM tag_sets ORDER BY id").fetchall()
    return [_tag_set(row) for row in rows]


def choose_tag_sets(store: IndexStore, choice: str | None) -> list[TagSet]:
    """The sets `--tag-set CHOICE` names (an id, or a name: several sets may share one); all sets for None.
    UsageError naming the sets there are when none matches."""
    sets = tag_sets(store)
    if choice is None:
        return sets
    chosen = [s for s in sets if choice == str(s.id) or choice == s.name]
    if not chosen:
        there = ", ".join(f"{s.id} ({s.name})" for s in sets) or "none; make one with `clap tag --index`"
        raise UsageError(f"index {store.index_dir} has no tag set {choice!r}; its tag sets are: {there}")
    return chosen


def save_tag_set(store: IndexStore, *, model: str, kind: str, name: str, labels: Sequence[str], labels_hash: str,
                 templates: Sequence[str], top_k: int, label_vectors: np.ndarray | None = None,
                 logit_scale: float | None = None, classifier: str | None = None) -> TagSet:
    """Add a tag set, or replace the one with the same key (model, kind, labels, templates): its tags are then
    dropped, to be written again. Returns the stored set."""
    if kind not in TAG_SET_KINDS:
        raise ValueError(f"tag set kind must be one of {TAG_SET_KINDS}, got {kind!r}")
    blob = None if label_vectors is None else np.ascontiguousarray(label_vectors, dtype=VECTOR_DTYPE).tobytes()
    key = (model, kind, labels_hash, json.dumps(list(templates)))
    conn = _conn(store)
    with store.transaction():
        row = conn.execute("SELECT id FROM tag_sets WHERE model = ? AND kind = ? AND labels_hash = ? AND templates = ?",
                           key).fetchone()
        values = (name, int(top_k), json.dumps(list(labels), ensure_ascii=False), blob,
                  None if logit_scale is None else float(logit_scale), classifier, time.time())
        if row is None:
            set_id = conn.execute(
                "INSERT INTO tag_sets (name, top_k, labels, label_vectors, logit_scale, classifier, created_at, model, "
                "kind, labels_hash, templates) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values + key).lastrowid
        else:
            set_id = row[0]
            conn.execute("UPDATE tag_sets SET name = ?, top_k = ?, labels = ?, label_vectors = ?, logit_scale = ?, "
                         "classifier = ?, created_at = ? WHERE id = ?", values + (set_id,))
            conn.execute("DELETE FROM file_tags WHERE set_id = ?", (set_id,))
    return next(s for s in tag_sets(store) if s.id == set_id)


def forget_tag_set(store: IndexStore, set_id: int) -> int:
    """Drop a tag set with its tags; returns how many files had tags in it."""
    conn = _conn(store)
    with store.transaction():
        (files,) = conn.execute("SELECT count(DISTINCT file_id) FROM file_tags WHERE set_id = ?", (set_id,)).fetchone()
        conn.execute("DELETE FROM tag_sets WHERE id = ?", (set_id,))
    return files


def write_tags(store: IndexStore, set_id: int, file_ids: np.ndarray, labels: Sequence[Sequence[str]],
               scores: np.ndarray) -> None:
    """Store the tags of these files in a set, replacing theirs: row i of `labels` (k labels, best first) and of
    `scores` (k,) belong to `file_ids[i]`. A set keeps one k (`save_tag_set` drops its tags when k changes), so
    replacing rank by rank replaces a file's tags whole."""
    conn = _conn(store)
    ids = [int(i) for i in file_ids]
    with store.transaction():
        conn.executemany(
            "INSERT OR REPLACE INTO file_tags (file_id, set_id, label, score, rank) VALUES (?, ?, ?, ?, ?)",
            ((file_id, set_id, label, float(score), rank)
             for file_id, row, row_scores in zip(ids, labels, scores.tolist())
             for rank, (label, score) in enumerate(zip(row, row_scores), 1)))


def file_vectors(store: IndexStore, after_id: int = 0, limit: int = 8192,
                 untagged_in: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The file-level vectors of up to `limit` searchable files with id > `after_id`, in id order: (file ids (n,)
    int64, vectors (n, D) float32, norms (n,) float64, NaN where none was recorded). With `untagged_in` (a set
    id), only the files that have no tags in that set. One query per chunk, so tags may be written between."""
    untagged = "" if untagged_in is None else \
        " AND NOT EXISTS (SELECT 1 FROM file_tags t WHERE t.file_id = s.file_id AND t.set_id = ?)"
    rows = _conn(store).execute(
        "SELECT s.file_id, e.vector, s.norm FROM segments s JOIN embeddings e ON e.segment_id = s.id "
        f"WHERE s.kind = 'file' AND s.file_id > ?{untagged} ORDER BY s.file_id LIMIT ?",
        (int(after_id),) + (() if untagged_in is None else (int(untagged_in),)) + (int(limit),)).fetchall()
    if not rows:
        return np.empty(0, dtype=np.int64), np.empty((0, store.dim or 0), dtype=np.float32), np.empty(0)
    ids, vectors = decode_vectors([(r[0], r[1]) for r in rows], store.dim, store.index_dir)
    return ids, vectors, np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)


def window_vectors(store: IndexStore, file_id: int) -> tuple[np.ndarray, np.ndarray]:
    """A file's windows: (vectors (W, D) float32, norms (W,) float64, NaN where none was recorded), by start."""
    rows = _conn(store).execute(
        "SELECT s.id, e.vector, s.norm FROM segments s JOIN embeddings e ON e.segment_id = s.id "
        "WHERE s.file_id = ? AND s.kind = 'window' ORDER BY s.start, s.id", (int(file_id),)).fetchall()
    if not rows:
        return np.empty((0, store.dim or 0), dtype=np.float32), np.empty(0)
    _, vectors = decode_vectors([(r[0], r[1]) for r in rows], store.dim, store.index_dir)
    return vectors, np.array([np.nan if r[2] is None else r[2] for r in rows], dtype=np.float64)


def record_norms(store: IndexStore, file_id: int, norms: Sequence[float | None]) -> None:
    """Record the raw-projection norms of a file's segments, given in the order they were stored (file-level
    first, then its windows, as `upsert_file` inserts them); None leaves a norm unrecorded."""
    conn = _conn(store)
    ids = [r[0] for r in conn.execute("SELECT id FROM segments WHERE file_id = ? ORDER BY id", (int(file_id),))]
    conn.executemany("UPDATE segments SET norm = ? WHERE id = ?",
                     [(None if n is None else float(n), i) for i, n in zip(ids, norms)])


def file_paths(store: IndexStore, file_ids: Iterable[int]) -> dict[int, str]:
    """file id → stored path."""
    found = {}
    wanted = sorted({int(i) for i in file_ids})
    for start in range(0, len(wanted), _IN_CHUNK):
        chunk = wanted[start : start + _IN_CHUNK]
        marks = ",".join("?" * len(chunk))
        found.update(_conn(store).execute(f"SELECT id, path FROM files WHERE id IN ({marks})", chunk).fetchall())
    return found


def tags_by_path(store: IndexStore, paths: Iterable[str], sets: Sequence[TagSet]) -> dict[str, list[tuple]]:
    """Stored path → its tags in `sets`: (label, score, set name), by set and then best first."""
    names = {s.id: s.name for s in sets}
    if not names:
        return {}
    found: dict[str, list[tuple]] = {}
    paths = sorted(set(paths))
    set_marks = ",".join("?" * len(names))
    for start in range(0, len(paths), _IN_CHUNK - len(names)):
        chunk = paths[start : start + _IN_CHUNK - len(names)]
        marks = ",".join("?" * len(chunk))
        rows = _conn(store).execute(
            f"SELECT f.path, t.set_id, t.label, t.score FROM file_tags t JOIN files f ON f.id = t.file_id "
            f"WHERE f.path IN ({marks}) AND t.set_id IN ({set_marks}) ORDER BY t.set_id, t.rank",
            chunk + list(names))
        for path, set_id, label, score in rows:
            found.setdefault(path, []).append((label, score, names[set_id]))
    return found


def paths_with_tags(store: IndexStore, labels: Sequence[str], sets: Sequence[TagSet]) -> set[str]:
    """The stored paths of the files holding every one of `labels` in one of `sets` (all labels in the same
    set or not: a file tagged "dog" by one set and "bark" by another holds both)."""
    if not sets:
        return set()
    set_marks = ",".join("?" * len(sets))
    found: set[str] | None = None
    for label in dict.fromkeys(labels):
        rows = _conn(store).execute(
            f"SELECT DISTINCT f.path FROM file_tags t JOIN files f ON f.id = t.file_id "
            f"WHERE t.label = ? AND t.set_id IN ({set_marks})", [label] + [s.id for s in sets])
        paths = {r[0] for r in rows}
        found = paths if found is None else found & paths
    return found or set()


def tagged_counts(store: IndexStore) -> dict[int, int]:
    """set id → how many files have tags in it."""
    rows = _conn(store).execute("SELECT set_id, count(DISTINCT file_id) FROM file_tags GROUP BY set_id")
    return dict(rows.fetchall())


def _tag_set(row) -> TagSet:
    (set_id, model, kind, name, labels_hash, templates, top_k, labels, blob, logit_scale, classifier,
     created_at) = row
    labels = json.loads(labels)
    vectors = None
    if blob is not None:
        vectors = np.frombuffer(blob, dtype=VECTOR_DTYPE).reshape(len(labels), -1).astype(np.float32)
    return TagSet(set_id, model, kind, name, labels_hash, json.loads(templates), top_k, labels, vectors, logit_scale,
                  classifier, created_at)


def tag_filter(store: IndexStore, tags: Sequence[str], not_tags: Sequence[str],
               sets: Sequence[TagSet]) -> Callable[[str], bool] | None:
    """`clap search --tag/--not-tag`: a test of stored paths, true for the files holding every one of `tags` and
    none of `not_tags` in `sets`; None when neither is given. UsageError for an index without tags, or a label
    that no set has (with the close ones)."""
    if not tags and not not_tags:
        return None
    if not sets:
        raise UsageError(f"index {store.index_dir} holds no tags; store them with "
                         f"`clap tag --index {store.index_dir} --labels SET`")
    known = {label for s in sets for label in s.labels}
    for label in list(tags) + list(not_tags):
        if label not in known:
            import difflib

            close = difflib.get_close_matches(label, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"no tag set of index {store.index_dir} has the label {label!r}{hint}")
    wanted = paths_with_tags(store, tags, sets) if tags else None
    unwanted: set[str] = set()
    for label in dict.fromkeys(not_tags):
        unwanted |= paths_with_tags(store, [label], sets)
    return lambda path: (wanted is None or path in wanted) and path not in unwanted


def hits_json(store: IndexStore, hits, sets: Sequence[TagSet]) -> list[dict]:
    """Search hits as `--json` objects (`clap search`, `clap mcp`); where the index holds tags (`sets`), each with
    its "tags": label, score (the probability stored by `clap tag --index`) and set (its name), by set and best
    first."""
    if not sets:
        return [h.to_dict() for h in hits]
    found = tags_by_path(store, [h.path for h in hits], sets)
    return [{**h.to_dict(), "tags": [{"label": label, "score": round(score, 6), "set": name}
                                     for label, score, name in found.get(h.path, [])]} for h in hits]
