"""Moved, renamed and copied files: recognised by content, given the vectors the index already holds.

A path the scan finds new is hashed anyway before it would be embedded (`indexer.plan_changes`); when a
stored row with vectors has the same size and content hash, the new path holds the same audio, and since a
store holds one model's vectors, the stored ones are exactly what a forward pass would give again. Only the
new paths are hashed, never the unchanged files, and the old paths' hashes are read from the store: renaming
a folder of 10,000 indexed files is a metadata operation, with no model loaded.

A stored row whose path is gone this run (pruned) is *moved*: the `files` row takes the new path in place and
keeps its id, so its segments, their vectors (and hnswlib labels) and anything else keyed by the file id go
with it, in the same transaction that would have dropped the old path. A row whose path is still there is
*copied*: a new row with copies of its segments and vectors. Several gone files with one content (duplicates
renamed at once) pair up by file name first, then in path order; every new path gets vectors either way.

`IndexStore` holds the store's SQL in store.py, which is at its size limit; the two writes here extend it
and run inside the indexer's `store.transaction()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .scan import ScanEntry
from .store import IndexStore

_COPIED_COLUMNS = "size, mtime_ns, content_hash, duration, sample_rate, channels, status, error, indexed_at, error_kind"


@dataclass
class Relocations:
    """What a run gives stored vectors to instead of embedding: (stored file id, new place) pairs."""

    moves: list[tuple[int, ScanEntry]] = field(default_factory=list)  # the row takes the new path
    copies: list[tuple[int, ScanEntry]] = field(default_factory=list)  # a new row with copies of the vectors


def find_relocations(plan, states: dict) -> Relocations:
    """Take out of `plan` (an `indexer.Plan`) the new paths whose content the store already holds with vectors,
    and the pruned paths whose rows move to them; returns what to do instead (`apply_relocations`).

    `states` is the store's `file_states()` the plan was made from."""
    targets = [e for e in plan.to_embed if str(e.path) in plan.new_paths and plan.hashes.get(str(e.path))]
    wanted = {(e.size, plan.hashes[str(e.path)]) for e in targets}
    if not wanted:
        return Relocations()
    sources: dict[tuple[int, str], list] = {}
    for record in states.values():
        key = (record.size, record.content_hash)
        if key in wanted and record.status in ("ok", "partial"):
            sources.setdefault(key, []).append(record)
    gone = set(plan.to_remove)
    found = Relocations()
    for entry in targets:
        path = str(entry.path)
        candidates = sources.get((entry.size, plan.hashes[path]))
        if not candidates:
            continue
        pruned = [r for r in candidates if r.path in gone]
        if pruned:
            same_name = [r for r in pruned if os.path.basename(r.path) == entry.path.name]
            record = min(same_name or pruned, key=lambda r: r.path)
            gone.discard(record.path)  # moved once; a second new path with this content gets a copy
            found.moves.append((record.id, entry))
        else:
            record = min(candidates, key=lambda r: r.path)
            found.copies.append((record.id, entry))
    relocated = {str(e.path) for _, e in found.moves + found.copies}
    moved_from = {p for p in plan.to_remove if p not in gone}  # `gone` has lost the moved rows' old paths
    plan.to_embed = [e for e in plan.to_embed if str(e.path) not in relocated]
    plan.new_paths -= relocated
    plan.to_remove = [p for p in plan.to_remove if p not in moved_from]
    return found


def apply_relocations(store: IndexStore, relocations: Relocations) -> None:
    """Write `relocations` into `store` (in the caller's transaction, before the pruned paths are removed):
    moves first, so a copy of a moved row's vectors reads them by its id wherever it now lives."""
    conn = store._conn  # noqa: SLF001 - see the module docstring
    with store.transaction():
        for file_id, entry in relocations.moves:
            conn.execute("UPDATE files SET path = ?, size = ?, mtime_ns = ? WHERE id = ?",
                         (str(entry.path), int(entry.size), int(entry.mtime_ns), file_id))
        for file_id, entry in relocations.copies:
            new_id = conn.execute(
                f"INSERT INTO files (path, {_COPIED_COLUMNS}) SELECT ?, {_COPIED_COLUMNS} FROM files WHERE id = ?",
                (str(entry.path), file_id)).lastrowid
            conn.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE id = ?",
                         (int(entry.size), int(entry.mtime_ns), new_id))
            segments = conn.execute('SELECT s.id, s.start, s."end", s.kind, s.norm, e.vector FROM segments s '
                                    "JOIN embeddings e ON e.segment_id = s.id WHERE s.file_id = ? ORDER BY s.id",
                                    (file_id,)).fetchall()
            for _, start, end, kind, norm, vector in segments:
                segment_id = conn.execute('INSERT INTO segments (file_id, start, "end", kind, norm) '
                                          "VALUES (?, ?, ?, ?, ?)", (new_id, start, end, kind, norm)).lastrowid
                conn.execute("INSERT INTO embeddings (segment_id, vector) VALUES (?, ?)", (segment_id, vector))
            conn.execute("INSERT INTO file_tags (file_id, set_id, label, score, rank) "  # the same sound: its tags
                         "SELECT ?, set_id, label, score, rank FROM file_tags WHERE file_id = ?", (new_id, file_id))
        if relocations.copies:
            store._bump_generation()  # noqa: SLF001 - copies add segments
