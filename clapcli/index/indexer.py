"""Scan → compare with the store → embed what changed → commit in batches → sync the hnswlib file.

Crash safety comes from the store: each batch of files is one SQLite transaction, so a kill at any
moment leaves the last committed batch, and a re-run sees those files as unchanged and carries on.
Pruning only touches paths under the roots being indexed (and folders reached through symlinks there),
never under a folder that could not be listed this time, nor under a root that held indexed files and now
lists no audio (an unmounted drive) unless `prune_empty` confirms it. A new index is created, and a
`--rebuild` started, only once the model has loaded; a rebuild fills a fresh database beside the old one and
swaps it in on success.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import ClapError, IndexStoreError
from .lock import WriterLock
from .scan import AUDIO_EXTENSIONS, ScanEntry, ScanProblem, matches_exclude, scan
from .schema import DB_FILENAME
from .store import IndexStore, content_hash

COMMIT_EVERY_FILES = 64  # files per SQLite transaction
COMMIT_EVERY_SECONDS = 30.0  # or sooner, so a slow batch never holds back a commit for long
LOCK_GRACE_SECONDS = 5.0  # how long a writer waits for the lock without --wait


@dataclass
class IndexSummary:
    index: str
    model: str
    scanned: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    touched: int = 0  # size/mtime changed but the content hash did not: no model work
    removed: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this run
    audio_seconds: float = 0.0  # embedded in this run
    seconds: float = 0.0
    total_files: int = 0
    total_segments: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, error) of every error row stored
    emptied_roots: list[tuple[str, int]] = field(default_factory=list)  # (folder, files kept): lists no audio now
    kept_aside: str | None = None  # where --rebuild moved a damaged database
    committed: int = 0  # files embedded (or recorded as unreadable) and committed in this run
    removed_excluded: int = 0  # of `removed`: indexed files that --exclude now matches
    partial: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): embedded in part, this run
    partial_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of every partial row

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "model": self.model,
            "scanned": self.scanned,
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "touched": self.touched,
            "removed": self.removed,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": p, "reason": r} for p, r in self.skipped],
            "audio_seconds": round(self.audio_seconds, 3),
            "seconds": round(self.seconds, 3),
            "files_per_second": round((self.added + self.updated) / self.seconds, 3) if self.seconds else 0.0,
            "audio_seconds_per_second": round(self.audio_seconds / self.seconds, 3) if self.seconds else 0.0,
            "total_files": self.total_files,
            "total_segments": self.total_segments,
            "total_errors": len(self.unreadable),
            "unreadable_files": [{"path": p, "reason": r} for p, r in self.unreadable],
            "partial": len(self.partial),
            "total_partial": len(self.partial_files),
            "partial_files": [{"path": p, "reason": r} for p, r in self.partial_files],
            "emptied_roots": [{"path": p, "kept_files": n} for p, n in self.emptied_roots],
            "kept_aside": self.kept_aside,
            "removed_excluded": self.removed_excluded,
        }


@dataclass
class Plan:
    to_embed: list[ScanEntry]  # new or changed content
    hashes: dict[str, str | None]  # content hash of each file to embed, taken before it is decoded
    new_paths: set[str]
    touched: list[ScanEntry]  # same content, new size/mtime
    unchanged: int
    to_remove: list[str]


def plan_changes(store: IndexStore, entries: Sequence[ScanEntry], roots: Sequence[Path],
                 unread_dirs: Sequence[Path] = (), linked_dirs: Sequence[str] = ()) -> Plan:
    """What to embed, re-stat and prune. Stored files are pruned when they were not seen under the roots
    or under a directory the scan reached through a symbolic link (stored paths are resolved, so those
    can lie outside every root). Files under `unread_dirs` (folders whose listing failed this time) are
    kept: a passing I/O or permission error must not empty part of the index."""
    states = store.file_states()
    to_embed, touched, new_paths, unchanged, hashes = [], [], set(), 0, {}
    seen = set()
    for entry in entries:
        path = str(entry.path)
        seen.add(path)
        state = states.get(path)
        if state is None:
            to_embed.append(entry)
            new_paths.add(path)
        elif state.size == entry.size and state.mtime_ns == entry.mtime_ns:
            unchanged += 1
        else:
            hashes[path] = _hash_or_none(path)
            if state.size == entry.size and state.content_hash and hashes[path] == state.content_hash:
                touched.append(entry)
            else:
                to_embed.append(entry)
    keep = [os.path.realpath(d) for d in unread_dirs]
    scope = [*roots, *linked_dirs]
    to_remove = [p for p in states if p not in seen and _under(p, scope) and not _under(p, keep)]
    # Hash what will be embedded now, before decoding: if a file is rewritten while it is being embedded,
    # its stored hash is the old content's, so the next run sees the change instead of a mere touch.
    for entry in to_embed:
        if str(entry.path) not in hashes:
            hashes[str(entry.path)] = _hash_or_none(str(entry.path))
    return Plan(to_embed, hashes, new_paths, touched, unchanged, to_remove)


def _under(path: str, dirs: Sequence) -> bool:
    return any(path == str(d) or path.startswith(str(d).rstrip(os.sep) + os.sep) for d in dirs)


def _excluded(path: str, roots: Sequence[Path], patterns: Sequence[str]) -> bool:
    """Whether --exclude matches a stored path as the scan tests it: the name, path relative to the root or
    absolute path of the file or of any folder above it under its root."""
    for root in roots:
        if path == str(root) or not _under(path, [root]):
            continue
        parts = Path(path).relative_to(root).parts
        for i in range(len(parts)):
            if matches_exclude(parts[i], "/".join(parts[: i + 1]), str(root.joinpath(*parts[: i + 1])), patterns):
                return True
    return False


def _hash_or_none(path: str) -> str | None:
    try:
        return content_hash(path)
    except OSError:
        return None


class IndexInterrupted(KeyboardInterrupt):
    """Ctrl-C during `build_index`; `message` says what was committed and how to carry on."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


REBUILD_DIR = ".rebuild"  # inside the index directory: where `--rebuild` builds before swapping in


def build_index(
    roots: Sequence[str | os.PathLike],
    index_dir: Path,
    load_model: Callable[[str | None], object],
    model_name: str | None = None,
    exclude: Sequence[str] = (),
    batch_size: int = 8,
    workers: int = 0,
    rebuild: bool = False,
    wait: bool = False,
    on_plan: Callable[[Plan], None] | None = None,
    on_file: Callable[[object], None] | None = None,
    commit_every: int = COMMIT_EVERY_FILES,
    prune_empty: bool = False,
    on_audio: Callable[[str, float, float], None] | None = None,
    on_committed: Callable[[], None] | None = None,
) -> IndexSummary:
    """Index `roots` into `index_dir`. `load_model(name)` is called only when something needs embedding.

    Nothing is written before the model has loaded when the run creates the index or rebuilds it, so a
    mistyped model leaves no empty index behind and never harms an existing one. `rebuild` builds a fresh
    store beside the old one (in `index_dir/.rebuild`) and swaps it in only on success; a database that
    cannot be opened is then kept aside as `index.sqlite.damaged-<time>`, never deleted. A root that held
    indexed files and now lists no audio (an unmounted drive) prunes nothing unless `prune_empty`.
    `on_audio(path, seconds, expected_seconds)` reports decoded audio as it goes, within long files too;
    `on_file(result)` each embedded (or failed) file. `on_committed()` is called under the writer lock once
    everything the run embedded is committed to the index (by a rebuild: swapped in).
    """
    started = time.monotonic()
    root_paths = []
    for r in roots:
        p = Path(r).expanduser()
        if not p.exists():
            raise ClapError(f"no such file or directory: {r}")
        root_paths.append(p.resolve())

    problems: list[ScanProblem] = []
    linked: list[str] = []
    entries = list(scan(root_paths, exclude=exclude, problems=problems, linked_dirs=linked))
    exists = IndexStore.exists(index_dir)
    if not entries and not exists:
        where = ", ".join(str(r) for r in roots)
        unread = f" ({len(problems)} paths could not be read)" if problems else ""
        raise ClapError(f"no audio files under {where}{unread}; nothing to index "
                        f"(looked for {', '.join('.' + e for e in sorted(AUDIO_EXTENSIONS))})")

    model = None
    damaged = False
    if rebuild or not exists:
        stored_identity = None
        if exists:
            try:
                with IndexStore.open(index_dir, readonly=True) as old:
                    stored_identity = old.model_identity
            except IndexStoreError:
                damaged = True  # kept aside when the rebuild succeeds
        # Without --model, a rebuild keeps the model the index was built with.
        model = load_model(model_name or (stored_identity or {}).get("model"))

    # Without --wait, still allow a few seconds: a `clap search` may hold the lock while it saves the hnsw file.
    with WriterLock(index_dir, wait=True, timeout=None if wait else LOCK_GRACE_SECONDS):
        if rebuild and IndexStore.exists(index_dir):
            summary = _rebuild(index_dir, model, damaged, root_paths, entries, problems, linked, prune_empty,
                               batch_size, workers, on_plan, (on_file, on_audio), commit_every)
        else:
            with IndexStore.open(index_dir, create=True) as store:
                summary = _update(store, model, load_model, model_name, root_paths, entries, problems, linked,
                                  prune_empty, batch_size, workers, on_plan, (on_file, on_audio), commit_every,
                                  exclude=exclude)
        if on_committed is not None:
            on_committed()
        with IndexStore.open(index_dir) as store:
            from .ann import AnnIndex

            AnnIndex.sync(store, persist=True)
            counts = store.counts()
            summary.total_files, summary.total_segments = counts.ok_files, counts.segments
            summary.unreadable = [(r.path, r.error or "") for r in store.error_files()]
            summary.partial_files = [(r.path, r.error or "") for r in store.partial_files()]
    summary.seconds = time.monotonic() - started
    return summary


def _update(store: IndexStore, model, load_model, model_name, root_paths, entries, problems, linked,
            prune_empty, batch_size, workers, on_plan, callbacks, commit_every, exclude=()) -> IndexSummary:
    """Bring `store` up to date with the scan: prune, re-stat, embed and commit in batches.

    `callbacks` is (on_file, on_audio), as `build_index` takes them."""
    stored_identity = store.model_identity
    name = model_name or (stored_identity or {}).get("model")
    states = store.file_states()
    empty = [] if prune_empty else _emptied_roots(root_paths, entries, linked, states)
    plan = plan_changes(store, entries, root_paths,
                        [p.path for p in problems if p.unread_dir] + [r for r, _ in empty], linked)
    summary = IndexSummary(str(store.index_dir), name or "")
    summary.scanned = len(entries)
    summary.unchanged = plan.unchanged
    summary.skipped.extend((str(p.path), p.reason) for p in problems)
    summary.emptied_roots = [(str(r), n) for r, n in empty]
    if on_plan:
        on_plan(plan)

    if model is None and (plan.to_embed or stored_identity is None or model_name):
        model = load_model(name)
    if model is not None:
        summary.model = model.model_ref
        # Refuses a different model unless the store is empty (a rebuild starts from an empty store).
        store.set_model_identity(model.identity_dict)
        if plan.to_embed:
            store.record_precision(model.precision)

    with store.transaction():
        store.remove_files(plan.to_remove)
        for entry in plan.touched:
            store.update_file_stat(str(entry.path), entry.size, entry.mtime_ns)
    summary.removed, summary.touched = len(plan.to_remove), len(plan.touched)
    summary.removed_excluded = sum(_excluded(p, root_paths, exclude) for p in plan.to_remove) if exclude else 0

    if plan.to_embed:
        try:
            _embed_and_commit(store, model, plan, summary, batch_size, workers, callbacks, commit_every)
        except KeyboardInterrupt:
            left = len(plan.to_embed) - summary.committed
            raise IndexInterrupted(
                f"interrupted: {summary.committed} files embedded and committed to {store.index_dir} in this run, "
                f"{left} not yet; run the same command again to resume"
            ) from None
    return summary


def _emptied_roots(roots: Sequence[Path], entries: Sequence[ScanEntry], linked: Sequence[str],
                   states: dict) -> list[tuple[Path, int]]:
    """Folders among `roots` that list no audio now but hold indexed files: (folder, files it holds).

    An unmounted drive's mount point or a disconnected share looks exactly like a folder whose files were
    all deleted; pruning is then left to an explicit `--prune-empty`."""
    found = [str(e.path) for e in entries] + list(linked)
    emptied = []
    for root in roots:
        if not root.is_dir() or any(_under(p, [root]) for p in found):
            continue
        held = sum(1 for p in states if _under(p, [root]))
        if held:
            emptied.append((root, held))
    return emptied


def _rebuild(index_dir: Path, model, damaged: bool, root_paths, entries, problems, linked, prune_empty,
             batch_size, workers, on_plan, callbacks, commit_every) -> IndexSummary:
    """Build a fresh store in `index_dir/.rebuild`, then swap it in; the old one serves until the swap."""
    db = index_dir / DB_FILENAME
    if not damaged and not prune_empty:
        with IndexStore.open(index_dir, readonly=True) as old:
            emptied = _emptied_roots(root_paths, entries, linked, old.file_states())
        if emptied:
            raise ClapError(emptied_message(emptied, "the rebuild was refused and the index is unchanged"))
    staging = index_dir / REBUILD_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left by a rebuild that was killed
    try:
        with IndexStore.open(staging, create=True) as store:
            summary = _update(store, model, None, None, root_paths, entries, problems, linked, True,
                              batch_size, workers, on_plan, callbacks, commit_every)
            store.checkpoint()  # everything in the main file, so the database is one file to move
        summary.index = str(index_dir)
        if damaged:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            kept = db.with_name(f"{DB_FILENAME}.damaged-{stamp}")
            os.replace(db, kept)
            summary.kept_aside = str(kept)
            for suffix in ("-wal", "-shm"):
                side = db.with_name(DB_FILENAME + suffix)
                if side.exists():
                    os.replace(side, kept.with_name(kept.name + suffix))
        else:
            with IndexStore.open(index_dir) as old:
                old.checkpoint()
        # An old WAL must never meet the new database: SQLite would replay its frames onto it.
        for suffix in ("-wal", "-shm"):
            db.with_name(DB_FILENAME + suffix).unlink(missing_ok=True)
        os.replace(staging / DB_FILENAME, db)
        from .ann import ANN_FILENAME, SIDECAR_FILENAME

        for name in (SIDECAR_FILENAME, ANN_FILENAME):  # the old store's graph, of no use to the new one
            (index_dir / name).unlink(missing_ok=True)
    except KeyboardInterrupt:
        raise IndexInterrupted("interrupted: the rebuild was abandoned and the index is unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def emptied_message(emptied: Sequence[tuple], outcome: str) -> str:
    folders = "; ".join(f"{root} held {n} indexed files" for root, n in emptied)
    return (f"{folders} and now lists no audio (an unmounted drive or a disconnected share?); {outcome}; "
            "pass --prune-empty to remove those files from the index")


def _embed_and_commit(store, model, plan: Plan, summary: IndexSummary, batch_size, workers, callbacks,
                      commit_every: int) -> None:
    on_file, on_audio = callbacks
    by_path = {str(e.path): e for e in plan.to_embed}
    sharded = getattr(model, "sharded", False)  # a torchrun-sharded run (distributed.py)
    progress = {"on_audio": on_audio} if on_audio is not None and not sharded else {}
    results = model.embed_files(list(by_path), batch_size=batch_size, segments=True, workers=workers, **progress)
    for batch in _commit_batches(results, commit_every, on_file, COMMIT_EVERY_SECONDS):
        with store.transaction():  # the batch lands whole or not at all
            for result in batch:
                _store_result(store, result, by_path[result.path], plan, summary)
        summary.committed += len(batch)


def _commit_batches(results, commit_every: int, on_file, seconds: float) -> Iterator[list]:
    """Group embedded files for one commit: `commit_every` files, or fewer after `seconds`."""
    batch, started = [], time.monotonic()
    for result in results:
        batch.append(result)
        if on_file:
            on_file(result)
        if len(batch) >= commit_every or time.monotonic() - started > seconds:
            yield batch
            batch, started = [], time.monotonic()
    if batch:
        yield batch


def _store_result(store, result, entry: ScanEntry, plan: Plan, summary: IndexSummary) -> None:
    digest = plan.hashes.get(result.path)
    if result.error is not None:
        store.record_error(result.path, entry.size, entry.mtime_ns, digest, result.error)
        summary.skipped.append((result.path, result.error))
        return
    segments = [(0.0, result.duration, "file", result.embedding)]
    segments += [(s.start, s.end, "window", s.embedding) for s in result.segments]
    partial = getattr(result, "partial", None)
    store.upsert_file(result.path, entry.size, entry.mtime_ns, digest, result.duration,
                      result.sample_rate or 0, result.channels or 0, segments, partial=partial)
    if partial is not None:
        summary.partial.append((result.path, partial))
    summary.audio_seconds += result.duration
    if result.path in plan.new_paths:
        summary.added += 1
    else:
        summary.updated += 1
