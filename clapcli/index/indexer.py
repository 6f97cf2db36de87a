"""Scan → compare with the store → embed what changed → commit in batches → sync the hnswlib file.

Crash safety comes from the store: each batch of files is one SQLite transaction, so a kill at any
moment leaves the last committed batch, and a re-run sees those files as unchanged and carries on.
Pruning only touches paths under the roots being indexed (and folders reached through symlinks there),
never under a folder that could not be listed this time, nor a file that could not be stat'ed or read this
time, nor under a root (or a folder at any depth) that held indexed files and now lists nothing (an unmounted
drive) unless `prune_empty` confirms it. The index remembers its roots: no roots means all of them, and a
`--rebuild` must cover them all (or `forget` some on purpose). A new index is created, and a `--rebuild`
started, only once the model has loaded; a rebuild fills a fresh database beside the old one and swaps it in
on success.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import DATA_FAILURE, ENVIRONMENT_FAILURE, ClapError, IndexStoreError, UsageError
from .lock import WriterLock
from .scan import AUDIO_EXTENSIONS, ScanEntry, ScanProblem, matches_exclude, scan
from .schema import DB_FILENAME
from .store import IndexStore, content_hash
from .summary import IndexSummary
from .tag_store import record_norms

COMMIT_EVERY_FILES = 64  # files per SQLite transaction
COMMIT_EVERY_SECONDS = 30.0  # or sooner: wall time since the last commit, so a slow batch never holds one back
COMMIT_EVERY_AUDIO_SECONDS = 600.0  # or sooner: audio embedded since the last commit (a few long takes)
LOCK_GRACE_SECONDS = 5.0  # how long a writer waits for the lock without --wait


@dataclass
class Plan:
    to_embed: list[ScanEntry]  # new or changed content
    hashes: dict[str, str | None]  # content hash of each file to embed, taken before it is decoded
    new_paths: set[str]
    touched: list[ScanEntry]  # same content, new size/mtime
    unchanged: int
    to_remove: list[str]
    retried: list[str] = field(default_factory=list)  # of to_embed: unchanged error rows of environmental failures
    embedded: set[str] = field(default_factory=set)  # of to_embed: stored with embeddings (status ok or partial)


@dataclass
class CommitRule:
    """When the indexer commits: after `files` files, `seconds` of wall time or `audio_seconds` of audio since
    the last commit, whichever comes first. Time and audio bound the work an interruption costs on a folder of
    long takes, where 64 files can be hours of audio."""

    files: int = COMMIT_EVERY_FILES
    seconds: float = COMMIT_EVERY_SECONDS  # wall time
    audio_seconds: float = COMMIT_EVERY_AUDIO_SECONDS  # audio embedded
    _started: float = 0.0  # time.monotonic() of the last commit
    _audio: float = 0.0  # audio seconds embedded since then

    def restart(self) -> None:
        self._started, self._audio = time.monotonic(), 0.0

    def add(self, audio_seconds: float) -> None:
        self._audio += audio_seconds

    def due(self, files: int) -> bool:
        return (files >= self.files or time.monotonic() - self._started >= self.seconds
                or self._audio >= self.audio_seconds)


@dataclass
class _Scanned:
    """What the scan of this run's roots found, for `_update` and `_rebuild` to compare with a store."""

    roots: list[Path]  # absolute, resolved
    entries: list[ScanEntry]
    problems: list[ScanProblem]  # paths that could not be listed, stat'ed or read
    linked: list[str]  # folders the scan reached through symbolic links
    empty_dirs: list[str]  # folders at any depth whose listing was empty


@dataclass
class _Embedding:
    """How this run embeds, commits and reports (`build_index`'s options and callbacks)."""

    batch_size: int
    workers: int
    commits: CommitRule
    on_plan: Callable[[Plan], None] | None = None
    on_file: Callable[[object], None] | None = None
    on_audio: Callable[[str, float, float], None] | None = None


def plan_changes(store: IndexStore, entries: Sequence[ScanEntry], roots: Sequence[Path],
                 unread_dirs: Sequence[Path] = (), linked_dirs: Sequence[str] = ()) -> Plan:
    """What to embed, re-stat and prune. Stored files are pruned when they were not seen under the roots
    or under a directory the scan reached through a symbolic link (stored paths are resolved, so those
    can lie outside every root). Files under `unread_dirs` (folders whose listing failed this time) are
    kept: a passing I/O or permission error must not empty part of the index. An unchanged file whose last
    attempt failed for an environmental reason (`FileRecord.retried`) is embedded again."""
    states = store.file_states()
    to_embed, touched, new_paths, unchanged, hashes, retried = [], [], set(), 0, {}, []
    seen = set()
    for entry in entries:
        path = str(entry.path)
        seen.add(path)
        state = states.get(path)
        if state is None:
            to_embed.append(entry)
            new_paths.add(path)
        elif state.size == entry.size and state.mtime_ns == entry.mtime_ns:
            if state.retried:
                to_embed.append(entry)
                retried.append(path)
            else:
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
    embedded = {str(e.path) for e in to_embed if str(e.path) in states and states[str(e.path)].status != "error"}
    return Plan(to_embed, hashes, new_paths, touched, unchanged, to_remove, retried, embedded)


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
    forget: Sequence[str | os.PathLike] = (),
    on_committed: Callable[[], None] | None = None,
    commit_seconds: float = COMMIT_EVERY_SECONDS,
    commit_audio_seconds: float = COMMIT_EVERY_AUDIO_SECONDS,
) -> IndexSummary:
    """Index `roots` into `index_dir`. `load_model(name)` is called only when something needs embedding.

    The index remembers its roots. No `roots` means all the remembered ones (one that no longer exists then
    counts as a folder that lists nothing); a `rebuild` that leaves a remembered root out is refused unless
    `forget` names it. `forget` drops remembered roots and their files from the index.

    Nothing is written before the model has loaded when the run creates the index or rebuilds it, so a
    mistyped model leaves no empty index behind and never harms an existing one. `rebuild` builds a fresh
    store beside the old one (in `index_dir/.rebuild`) and swaps it in only on success; a database that
    cannot be opened is then kept aside as `index.sqlite.damaged-<time>`, never deleted. A root that held
    indexed files and now lists no audio (an unmounted drive), or a folder inside one that now lists nothing,
    prunes nothing unless `prune_empty`.
    `on_audio(path, seconds, expected_seconds)` reports decoded audio as it goes, within long files too;
    `on_file(result)` each embedded (or failed) file. `on_committed()` is called under the writer lock once
    everything the run embedded is committed to the index (by a rebuild: swapped in).

    Embedded files are committed every `commit_every` files, `commit_seconds` of wall time or
    `commit_audio_seconds` of audio, whichever comes first, and on Ctrl-C (KeyboardInterrupt) the files
    finished since the last commit are committed before `IndexInterrupted` is raised: an interruption costs
    the files in flight, whatever their lengths.
    """
    commits = CommitRule(commit_every, commit_seconds, commit_audio_seconds)
    started = time.monotonic()
    remembered = _remembered_roots(index_dir, rebuild)
    forgotten = _forgotten_roots(forget, remembered, index_dir)
    root_paths = []
    for r in roots:
        p = Path(r).expanduser()
        if not p.exists():
            raise ClapError(f"no such file or directory: {r}")
        root_paths.append(p.resolve())
    if not roots:
        if not remembered and not forgotten:
            raise UsageError(_no_roots_message(index_dir))
        root_paths = [Path(r) for r in remembered if r not in forgotten]
    if rebuild:
        left_out = [r for r in remembered if r not in forgotten and not _under(r, root_paths)]
        if left_out:
            raise ClapError(left_out_message(index_dir, left_out))

    problems: list[ScanProblem] = []
    linked: list[str] = []
    empty_dirs: list[str] = []
    present = [p for p in root_paths if p.exists()]  # a remembered root may be gone (an unmounted drive)
    entries = list(scan(present, exclude=exclude, problems=problems, linked_dirs=linked, empty_dirs=empty_dirs))
    found = _Scanned(root_paths, entries, problems, linked, empty_dirs)
    run = _Embedding(batch_size, workers, commits, on_plan, on_file, on_audio)
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

    # Without --wait, still allow a few seconds: a read-only open may hold the lock while it upgrades the schema.
    with WriterLock(index_dir, wait=True, timeout=None if wait else LOCK_GRACE_SECONDS):
        if rebuild and IndexStore.exists(index_dir):
            summary = _rebuild(index_dir, model, damaged, found, run, prune_empty)
        else:
            with IndexStore.open(index_dir, create=True) as store:
                summary = _update(store, model, found, run, prune_empty=prune_empty, load_model=load_model,
                                  model_name=model_name, exclude=exclude, forget=forgotten)
        if on_committed is not None:
            on_committed()
        with IndexStore.open(index_dir) as store:
            from .ann import AnnIndex

            AnnIndex.sync(store, persist=True)
            counts = store.counts()
            summary.total_files, summary.total_segments = counts.ok_files, counts.segments
            summary.unreadable = [(r.path, r.error or "") for r in store.error_files()]
            summary.partial_files = [(r.path, r.error or "") for r in store.partial_files()]
            summary.precisions = store.precisions
            summary.retry_files = [(r.path, r.error or "") for r in store.error_files() if r.retried]
    summary.seconds = time.monotonic() - started
    return summary


def _update(store: IndexStore, model, found: _Scanned, run: _Embedding, *, prune_empty: bool, load_model=None,
            model_name: str | None = None, exclude=(), forget=()) -> IndexSummary:
    """Bring `store` up to date with the scan: prune, re-stat, embed and commit in batches; remember
    `root_paths` and forget the roots in `forget`, with their files.

    `model` is the loaded model, or None to load it with `load_model(name)` only when there is something to
    embed (or the store has no model yet, or `model_name` asks for one)."""
    root_paths, entries, problems = found.roots, found.entries, found.problems
    stored_identity = store.model_identity
    name = model_name or (stored_identity or {}).get("model")
    states = store.file_states()
    empty = [] if prune_empty else _emptied_roots(root_paths, entries, found.linked, states, found.empty_dirs)
    plan = plan_changes(store, entries, root_paths,
                        [p.path for p in problems if p.unread_dir or p.unread] + [r for r, _ in empty], found.linked)
    summary = IndexSummary(str(store.index_dir), name or "")
    summary.scanned = len(entries)
    summary.unchanged = plan.unchanged
    summary.retried = len(plan.retried)
    summary.skipped.extend((str(p.path), p.reason) for p in problems)
    summary.emptied_roots = [(str(r), n) for r, n in empty]
    unread = {os.path.realpath(p.path): p.reason for p in problems if p.unread}
    summary.kept_unread = [(path, unread[path]) for path in sorted(unread) if path in states]
    if forget:
        covered = [*root_paths, *(r for r in store.roots() if r not in forget)]
        pruned = set(plan.to_remove)
        for folder in forget:
            dropped = [p for p in states if _under(p, [folder]) and not _under(p, covered) and p not in pruned]
            summary.forgotten.append((folder, len(dropped)))
            plan.to_remove.extend(dropped)
            pruned.update(dropped)
    if run.on_plan:
        run.on_plan(plan)

    if model is None and (plan.to_embed or stored_identity is None or model_name):
        model = load_model(name)
    if model is not None:
        summary.model = model.model_ref
        # Refuses a different model unless the store is empty (a rebuild starts from an empty store).
        store.set_model_identity(model.identity_dict)
        if plan.to_embed:
            store.record_precision(model.precision)

    with store.transaction():
        store.forget_roots(forget)
        store.add_roots(str(p) for p in root_paths)
        store.remove_files(plan.to_remove)
        for entry in plan.touched:
            store.update_file_stat(str(entry.path), entry.size, entry.mtime_ns)
    summary.removed, summary.touched = len(plan.to_remove), len(plan.touched)
    summary.removed_excluded = sum(_excluded(p, root_paths, exclude) for p in plan.to_remove) if exclude else 0

    if plan.to_embed:
        try:
            _embed_and_commit(store, model, plan, summary, run)
        except KeyboardInterrupt:
            left = len(plan.to_embed) - summary.committed
            raise IndexInterrupted(
                f"interrupted: {summary.committed} files embedded and committed to {store.index_dir} in this run, "
                f"{left} not yet; run the same command again to resume"
            ) from None
    return summary


def _emptied_roots(roots: Sequence[Path], entries: Sequence[ScanEntry], linked: Sequence[str],
                   states: dict, empty_dirs: Sequence[str] = ()) -> list[tuple[Path, int]]:
    """Folders that hold indexed files but list nothing now: (folder, files it holds). These are the `roots`
    that list no audio (or, remembered, no longer exist) and the folders at any depth (`empty_dirs`, from the
    scan) whose listing was empty.

    An unmounted drive's mount point or a disconnected share looks exactly like a folder whose files were
    all deleted; pruning is then left to an explicit `--prune-empty`."""
    found = [str(e.path) for e in entries]
    stored = sorted(states)
    emptied: list[tuple[Path, int]] = []
    for folder in [*roots, *map(Path, empty_dirs)]:  # an empty dir has nothing under it to look for
        if folder.is_file() or any(_under(str(folder), [f]) for f, _ in emptied):
            continue
        if folder in roots and (any(_under(p, [folder]) for p in found)
                                or any(_under(p, [folder]) and p != str(folder) for p in linked)):
            continue
        held = _count_under(stored, str(folder))
        if held:
            emptied.append((folder, held))
    return emptied


def _count_under(stored: Sequence[str], folder: str) -> int:
    """How many of the sorted paths `stored` are `folder` or lie under it."""
    prefix = folder.rstrip(os.sep) + os.sep
    after = prefix[:-1] + chr(ord(os.sep) + 1)  # the first string above every "folder/…"
    at = bisect.bisect_left(stored, folder)
    exact = at < len(stored) and stored[at] == folder
    return bisect.bisect_left(stored, after) - bisect.bisect_left(stored, prefix) + exact


def _remembered_roots(index_dir: Path, rebuild: bool) -> list[str]:
    """The roots the index in `index_dir` remembers; [] for a new index, or a damaged one that `rebuild` replaces."""
    if not IndexStore.exists(index_dir):
        return []
    try:
        with IndexStore.open(index_dir, readonly=True) as store:
            return store.roots()
    except IndexStoreError:
        if rebuild:
            return []
        raise


def _forgotten_roots(forget: Sequence, remembered: Sequence[str], index_dir: Path) -> list[str]:
    """`forget` as remembered roots (absolute, resolved); a folder the index does not remember is refused."""
    forgotten = [os.path.realpath(os.path.expanduser(f)) for f in forget]
    unknown = [f for f, real in zip(forget, forgotten) if real not in remembered]
    if unknown:
        known = ", ".join(remembered) or "none remembered yet"
        raise UsageError(f"--forget {unknown[0]}: not a folder index {index_dir} was built from ({known})")
    return forgotten


def _no_roots_message(index_dir: Path) -> str:
    if not IndexStore.exists(index_dir):
        return f"no index at {index_dir}; name the folders to index: `clap index DIR…`"
    return (f"index {index_dir} does not know the folders it was built from (it predates clap remembering them, "
            "or its database is damaged); name them once: `clap index DIR…`")


def left_out_message(index_dir: Path, left_out: Sequence[str]) -> str:
    folders = ", ".join(left_out)
    forget = " ".join(f"--forget {f}" for f in left_out)
    return (f"index {index_dir} was also built from {folders}, which this --rebuild leaves out; the rebuild was "
            "refused and the index is unchanged; name every folder, or run `clap index --rebuild` with no folder "
            f"to rebuild them all, or drop the left-out ones from the index on purpose with `{forget}`")


def _rebuild(index_dir: Path, model, damaged: bool, found: _Scanned, run: _Embedding,
             prune_empty: bool) -> IndexSummary:
    """Build a fresh store in `index_dir/.rebuild`, then swap it in; the old one serves until the swap."""
    db = index_dir / DB_FILENAME
    if not damaged:
        with IndexStore.open(index_dir, readonly=True) as old:
            stored = sorted(old.file_states())
        emptied = [] if prune_empty else _emptied_roots(found.roots, found.entries, found.linked,
                                                         dict.fromkeys(stored), found.empty_dirs)
        if emptied:
            raise ClapError(emptied_message(emptied, "the rebuild was refused and the index is unchanged"))
        # The new store could not hold them: a passing fault must cost a retry, not the files' embeddings.
        unread = [(p, _count_under(stored, os.path.realpath(p.path))) for p in found.problems
                  if p.unread or p.unread_dir]
        unread = [(p, n) for p, n in unread if n]
        if unread:
            held = "; ".join(f"{p.path}: {p.reason} ({n} indexed files)" for p, n in unread[:3])
            more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
            raise ClapError(f"indexed files could not be read this run ({held}{more}); the rebuild was refused and "
                            "the index is unchanged; run it again when they can be read, or --exclude them")
    staging = index_dir / REBUILD_DIR
    shutil.rmtree(staging, ignore_errors=True)  # left by a rebuild that was killed
    try:
        with IndexStore.open(staging, create=True) as store:
            summary = _update(store, model, found, run, prune_empty=True)
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


def _embed_and_commit(store, model, plan: Plan, summary: IndexSummary, run: _Embedding) -> None:
    """Embed `plan.to_embed` and commit the results as `commits` says; on KeyboardInterrupt, commit the files
    finished since the last commit before letting it through (a sharded run's too: its partitions stay until
    the whole run is committed)."""
    on_file, on_audio, commits = run.on_file, run.on_audio, run.commits
    by_path = {str(e.path): e for e in plan.to_embed}
    progress = {"on_audio": on_audio} if on_audio is not None else {}
    results = model.embed_files(list(by_path), batch_size=run.batch_size, segments=True, workers=run.workers,
                                **progress)
    batch: list = []
    committing = False

    def commit() -> None:
        nonlocal batch, committing
        committing = True
        with store.transaction():  # the batch lands whole or not at all
            for result in batch:
                _store_result(store, result, by_path[result.path], plan, summary)
        committing = False
        summary.committed += len(batch)
        batch = []
        commits.restart()

    commits.restart()
    try:
        for result in results:
            batch.append(result)
            commits.add(result.duration)
            if on_file:
                on_file(result)
            if commits.due(len(batch)):
                commit()
    except KeyboardInterrupt:
        if batch and not committing:  # an interrupted commit was rolled back: leave it
            commit()
        raise
    if batch:
        commit()


def _store_result(store, result, entry: ScanEntry, plan: Plan, summary: IndexSummary) -> None:
    """Store one embedded file, or its failure. A file stored with embeddings whose re-embed failed keeps its
    row as it was, embeddings and old size/mtime included, so it stays searchable and the next run tries
    again; any other failure becomes an error row with its kind (an environmental one is tried again on the
    next run, a data one once the file changes)."""
    digest = plan.hashes.get(result.path)
    if result.error is not None:
        kind = result.error_kind or DATA_FAILURE
        summary.skipped.append((result.path, result.error))
        if kind == ENVIRONMENT_FAILURE:
            summary.environment_failures += 1
        if result.path in plan.embedded:
            summary.kept_previous.append((result.path, result.error))
        else:
            store.record_error(result.path, entry.size, entry.mtime_ns, digest, result.error, kind)
        return
    segments = [(0.0, result.duration, "file", result.embedding)]
    segments += [(s.start, s.end, "window", s.embedding) for s in result.segments]
    partial = getattr(result, "partial", None)
    file_id = store.upsert_file(result.path, entry.size, entry.mtime_ns, digest, result.duration,
                                result.sample_rate or 0, result.channels or 0, segments, partial=partial)
    record_norms(store, file_id, [result.norm] + [s.norm for s in result.segments])  # for classifier heads
    if partial is not None:
        summary.partial.append((result.path, partial))
    summary.audio_seconds += result.duration
    if result.path in plan.new_paths:
        summary.added += 1
    else:
        summary.updated += 1
