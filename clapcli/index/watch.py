"""`clap index DIR… --watch`: keep an index current as files arrive, change, move or go.

A watch session runs the normal incremental `clap index` once, then watches its roots through watchdog
(inotify on Linux, FSEvents on macOS, ReadDirectoryChangesW on Windows) and, once events have stopped for
`debounce` seconds and no file they named is still changing size, runs the normal incremental update again
over the roots. That run is what keeps the index right: it skips unchanged files by their stat, re-embeds
changed ones, prunes deleted ones, recognises moved ones, commits as it goes and keeps every guard of a
normal run (a root that now lists nothing prunes nothing); the events only say when to run. The model is
loaded once per session, when a run first has something to embed. A run holds the writer lock only while it
runs, so another `clap index` can write between updates (an update waits for it).

Events that cannot change the index start nothing: names the scan would not try (no audio extension: a
download's `.part` or `.crdownload`, an editor's `name~`), paths that --exclude matches, and anything in the
index's own directory. A file being read (by the indexer itself, for one) is no event.

Every root is also stat'ed once a second: a root that disappears (a card ejected) is reported and left out of
the updates, so nothing under it is pruned, and one that comes back, or is replaced (a card mounted on the
same folder), is watched again and brings an update.
"""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ClapError
from . import indexer
from .build import IndexRequest, ModelLoader, index_options, save_text_query
from .scan import AUDIO_EXTENSIONS, matches_exclude, scan
from .store import IndexStore
from .summary import IndexSummary

DEFAULT_DEBOUNCE_SECONDS = 2.0  # quiet time after the last event before an update runs
ROOT_CHECK_SECONDS = 1.0  # how often each root is stat'ed: gone, back, or another file system mounted on it
# What a watch reacts to: a file written, created, deleted or moved (watchdog's event_type names). Not
# "opened" nor "closed_no_write": the indexer reading a file must not bring another update.
_CHANGES = frozenset({"created", "modified", "moved", "deleted", "closed"})


@dataclass
class WatchUpdate:
    """One run of a watch session: its summary (all zeros when no run was possible) and what kept it from
    covering everything."""

    summary: IndexSummary
    missing_roots: list[str] = field(default_factory=list)  # watched roots that do not exist now: not pruned
    error: str | None = None  # why the run was refused (a ClapError's message); the session goes on
    first: bool = False  # the run the session starts with

    @property
    def changed(self) -> bool:
        """Whether the update has anything to say: files added, re-embedded, removed or skipped, roots missing
        or listing nothing, or a refusal."""
        s = self.summary
        return bool(s.added or s.updated or s.removed or s.moved or s.copied or s.skipped or s.emptied_roots or self.missing_roots
                    or self.error or self.first)

    def to_dict(self) -> dict:
        return {**self.summary.to_dict(), "missing_roots": self.missing_roots, "error": self.error}


def watch_index(request: IndexRequest, *, on_update: Callable[[WatchUpdate], None],
                debounce: float = DEFAULT_DEBOUNCE_SECONDS,
                on_watching: Callable[[list[Path]], None] | None = None, on_plan: Callable | None = None,
                on_file: Callable | None = None, on_audio: Callable | None = None) -> int:
    """Index `request`'s roots, then keep the index current until KeyboardInterrupt;
    returns the number of updates that ran. `on_update(update)` is called after each run (the first one too),
    `on_watching(roots)` once the roots are watched; `on_plan`, `on_file` and `on_audio` are `build_index`'s.

    The first run is the request as given (a `--rebuild` or `--forget` happens then); a ClapError there ends
    the session, as it ends `clap index`. Later runs are plain incremental updates of the watched roots that
    exist (waiting for another writer rather than failing); a ClapError there is reported in the update and
    the session goes on. A KeyboardInterrupt raised during a run (`indexer.IndexInterrupted`) has committed what
    was finished, and passes through like any other."""
    from watchdog.observers import Observer

    loader = _SessionLoader(request)
    callbacks = dict(on_plan=on_plan, on_file=on_file, on_audio=on_audio)
    index_dir = request.index_dir
    roots = _watched_roots(request)
    later = dataclasses.replace(request, rebuild=False, forget=(), forget_exclude=(), wait=True)
    updates = 0
    # Watched before the first run, so what changes while it runs (a long first index) brings an update after it.
    changes = _Changes(roots, index_dir, request.exclude)
    observer = Observer()
    watches = _RootWatches(observer, changes, roots)
    problem, _ = watches.refresh()
    if problem:
        raise ClapError(problem)
    try:
        observer.start()
        if not (request.roots and _nothing_to_index_yet(index_dir, roots, request.exclude)):
            # (an empty download folder is no error: the index is created with the first file that arrives)
            summary = _run(request, loader, callbacks)
            on_update(WatchUpdate(summary, [str(r) for r in watches.missing], first=True))
            updates += 1
        if on_watching is not None:
            on_watching(roots)
        while True:
            changed = changes.wait_until_quiet(debounce, timeout=ROOT_CHECK_SECONDS)
            problem, roots_changed = watches.refresh()
            if not (changed or roots_changed or problem):
                continue
            present = [r for r in roots if r not in watches.missing]
            update = WatchUpdate(IndexSummary(str(index_dir), ""), [str(r) for r in watches.missing], problem)
            if present and not _nothing_to_index_yet(index_dir, present, request.exclude):
                try:
                    update.summary = _run(dataclasses.replace(later, roots=[str(r) for r in present]), loader,
                                          callbacks)
                    updates += 1
                except ClapError as exc:
                    update.error = str(exc)
            on_update(update)
    finally:
        if observer.is_alive():
            observer.stop()
            observer.join(timeout=5)
    return updates


def _watched_roots(request: IndexRequest) -> list[Path]:
    """The roots a session watches: those named, else those the index remembers less the ones to forget (none
    when there is no index: the first run then says what to do)."""
    if request.roots:
        return [Path(r).expanduser().resolve() for r in request.roots]
    if not IndexStore.exists(request.index_dir):
        return []
    with IndexStore.open(request.index_dir, readonly=True) as store:
        remembered = store.roots()
    forgotten = {os.path.realpath(os.path.expanduser(f)) for f in request.forget}
    return [Path(r) for r in remembered if r not in forgotten]


def _run(request: IndexRequest, loader: _SessionLoader, callbacks: dict) -> IndexSummary:
    """One incremental run with the session's model; the model's text-query graph is saved once per session
    (as `build.build` does after each run)."""
    summary = indexer.build_index(request.roots, request.index_dir, loader, **index_options(request), **callbacks)
    if loader.model is not None and not loader.saved_text_query and request.saves_text_query:
        save_text_query(loader.model)
        loader.saved_text_query = True
    return summary


class _SessionLoader:
    """`build.ModelLoader` that keeps the model for the whole session: loaded when a run first needs it, then
    handed to every run that asks for the same model again."""

    def __init__(self, request: IndexRequest):
        self._loader = ModelLoader(request)
        self._names: set[str | None] = set()  # the names the loaded model answers to
        self.model = None
        self.saved_text_query = False

    def __call__(self, name: str | None):
        if self.model is None or name not in self._names:
            self.model = self._loader(name)
            self._names = {name, self.model.model_ref}
        return self.model


def _nothing_to_index_yet(index_dir: Path, roots: Sequence[Path], exclude: Sequence[str]) -> bool:
    """No index yet and no audio under `roots` (all of them there): `clap index` would refuse to create an empty
    index, and a watch waits for the first file instead."""
    if IndexStore.exists(index_dir) or not all(r.exists() for r in roots):
        return False
    return next(iter(scan(roots, exclude=exclude)), None) is None


class _Changes:
    """The paths that events named since the last update, each with its stat then; filled by the observer's
    thread, taken by the session's.

    A "modified" (or "closed") event on a file whose size, mtime, mode and owner are those it had when it was last taken is
    left out: reading a file can update its access time, which inotify reports as a change (IN_ATTRIB), and
    the indexer reading what changed must not bring another update. A chmod or chown still counts: it can make
    a file readable that was skipped."""

    def __init__(self, roots: Sequence[Path], index_dir: Path, exclude: Sequence[str]):
        self.roots = list(roots)
        self.index_dir = Path(os.path.realpath(index_dir))
        self.exclude = list(exclude)
        self._pending: dict[str, tuple | None] = {}  # path -> its stat (`_file_state`) at its last event
        self._taken: dict[str, tuple | None] = {}  # path -> its stat when it was last taken
        self._last = 0.0  # monotonic time of the last event
        self._cond = threading.Condition()

    def dispatch(self, event) -> None:  # watchdog's handler interface
        if event.event_type not in _CHANGES:
            return
        paths = [os.fsdecode(event.src_path)]
        if event.event_type == "moved":
            paths.append(os.fsdecode(event.dest_path))
        relevant = [p for p in paths if self._relevant(p, event.is_directory, event.event_type)]
        stats = {p: _file_state(p) for p in relevant}
        with self._cond:
            if event.event_type in ("modified", "closed") and not event.is_directory:
                stats = {p: s for p, s in stats.items() if p not in self._taken or self._taken[p] != s}
            if not stats:
                return
            self._pending.update(stats)
            self._last = time.monotonic()
            self._cond.notify_all()

    def _relevant(self, path: str, is_directory: bool, kind: str) -> bool:
        """Whether an event on `path` can change the index: under a root, outside the index, a name the scan
        would try (or a root named as a file), not excluded; a folder only when it moved or went (its files
        each bring their own events when it arrives)."""
        if _under(path, [self.index_dir]):
            return False
        root = next((r for r in self.roots if _under(path, [r])), None)
        if root is None:
            return False
        if path == str(root):
            return True
        if is_directory:
            if kind not in ("moved", "deleted"):
                return False
        elif os.path.splitext(path)[1][1:].lower() not in AUDIO_EXTENSIONS:
            return False
        if self.exclude:
            parts = Path(path).relative_to(root).parts
            for i in range(len(parts)):
                if matches_exclude(parts[i], "/".join(parts[: i + 1]), str(root.joinpath(*parts[: i + 1])),
                                   self.exclude):
                    return False
        return True

    def wait_until_quiet(self, debounce: float, timeout: float) -> bool:
        """Wait up to `timeout` seconds for pending changes to settle: `debounce` seconds without an event and
        every pending file the size and mtime it had at its last event (a file still being written waits).
        True when they have settled (they are then taken), False when there were none or they are still
        settling."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._pending and now - self._last >= debounce:
                    moved = {p: s for p, s in ((p, _file_state(p)) for p in self._pending)
                             if s != self._pending[p]}
                    if not moved:
                        if len(self._taken) > 100_000:
                            self._taken.clear()
                        self._taken.update(self._pending)
                        self._pending.clear()
                        return True
                    self._pending.update(moved)  # still being written: another quiet period
                    self._last = now
                    continue
                wake = deadline if not self._pending else min(deadline, self._last + debounce)
                if now >= deadline:
                    return False
                self._cond.wait(max(0.0, wake - now) + 0.01)


class _RootWatches:
    """The observer's watches, one per root, and what each root is now (device and inode, or gone)."""

    def __init__(self, observer, handler: _Changes, roots: Sequence[Path]):
        self.observer = observer
        self.handler = handler
        self.roots = list(roots)
        self.identity: dict[Path, tuple[int, int] | None] = {}
        self.watches: dict[Path, object] = {}
        self.missing: list[Path] = []

    def refresh(self) -> tuple[str | None, bool]:
        """Watch the roots that appeared or changed since the last call (a root replaced or remounted is
        watched again: the old watch saw its old folder). Returns (a problem to report or None, whether any
        root changed: its files may have too)."""
        changed, problems = False, []
        for root in self.roots:
            identity = _identity(root)
            if root in self.identity and identity == self.identity[root]:
                continue
            changed = changed or root in self.identity
            self.identity[root] = identity
            watch = self.watches.pop(root, None)
            if watch is not None:
                with contextlib.suppress(KeyError, OSError):
                    self.observer.unschedule(watch)
            if identity is None:
                continue
            try:
                self.watches[root] = self.observer.schedule(self.handler, str(root), recursive=root.is_dir())
            except OSError as exc:
                problems.append(_watch_failure(root, exc))
        self.missing = [r for r in self.roots if self.identity[r] is None]
        return ("; ".join(problems) or None), changed


def _watch_failure(root: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:  # from inotify_add_watch: the per-user limit on watched folders
        return (f"cannot watch {root}: too many folders to watch (raise the limit, e.g. `sudo sysctl "
                "fs.inotify.max_user_watches=524288`)")
    return f"cannot watch {root}: {exc.strerror or exc}"


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _file_state(path: str) -> tuple | None:
    """What tells a file's change from a mere read: size, mtime, mode and owner (not the access time)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid


def _under(path: str, dirs: Sequence) -> bool:
    return any(path == str(d) or path.startswith(str(d).rstrip(os.sep) + os.sep) for d in dirs)
