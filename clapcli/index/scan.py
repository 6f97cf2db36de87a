"""Find the candidate audio files under some roots for `clap index`.

The scan picks files by extension only to decide what to *try*: every regular file with a known audio
extension is yielded, and decoding decides the rest (a `.wav` that is not audio becomes an error row
with its reason). Files named explicitly as roots are yielded whatever their extension. Symlinked
directories are followed, with loops detected by (st_dev, st_ino); unreadable directories and files,
broken links and loops are reported as `ScanProblem`s and never stop the scan; those that exist but cannot be
read this time are marked so, for the indexer to keep what it holds of them. Hidden directories are
scanned too (exclude them with `--exclude '.*'`).

Paths are absolute and resolved (symlinks replaced by their targets), each yielded once, in sorted
order, so two scans of the same tree give the same sequence.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

# Extensions worth handing to the decoder (lower case, without the dot). m4a is included although
# libsndfile cannot read it: such files are then reported as skipped with the reason instead of being
# silently ignored.
AUDIO_EXTENSIONS = frozenset(
    {"wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "snd", "caf", "w64",
     "rf64", "m4a"}
)


@dataclass(frozen=True)
class ScanEntry:
    path: Path  # absolute, resolved
    size: int  # bytes
    mtime_ns: int  # st_mtime_ns


@dataclass(frozen=True)
class ScanProblem:
    path: Path  # as reached by the walk (not resolved: it may be a broken link)
    reason: str  # one line, for the "skipped" summary
    unread_dir: bool = False  # a directory whose listing failed: what it held is unknown, not gone
    unread: bool = False  # exists but could not be stat'ed or read this time (not gone): keep what it held


def scan(
    roots: Iterable[str | os.PathLike],
    exclude: Iterable[str] = (),
    problems: list[ScanProblem] | None = None,
    extensions: Iterable[str] = AUDIO_EXTENSIONS,
    linked_dirs: list[str] | None = None,
    empty_dirs: list[str] | None = None,
) -> Iterator[ScanEntry]:
    """Yield the candidate audio files under `roots`, sorted by path, each once.

    `exclude` holds fnmatch globs tested against each file or directory name, its path relative to
    the root, and its absolute path (so `*.tmp`, `.git`, `drafts/*` and `*/old/*` all work); an excluded
    directory is not entered. Problems met on the way are appended to `problems` if given, and the real
    paths of directories reached through symbolic links (which may lie outside every root) to `linked_dirs`,
    and the real paths of directories that list nothing at all (an empty mount point?) to `empty_dirs`.

    The whole tree is walked before the first entry is yielded (that is what makes the order global);
    the indexer needs the full list anyway, for its totals and for pruning deleted files.
    """
    walker = _Walker(list(exclude), {e.lower().lstrip(".") for e in extensions})
    for root in roots:
        walker.scan_root(Path(root))
    if problems is not None:
        problems.extend(walker.problems)
    if linked_dirs is not None:
        linked_dirs.extend(walker.linked_dirs)
    if empty_dirs is not None:
        empty_dirs.extend(walker.empty_dirs)
    yield from sorted(walker.entries.values(), key=lambda e: str(e.path))


class _Walker:
    def __init__(self, exclude: list[str], extensions: set[str]):
        self.exclude = exclude
        self.extensions = extensions
        self.entries: dict[str, ScanEntry] = {}  # by resolved path
        self.problems: list[ScanProblem] = []
        self.scanned_dirs: set[tuple[int, int]] = set()  # (st_dev, st_ino) of directories walked
        self.linked_dirs: list[str] = []  # real paths of directories entered through a symbolic link
        self.empty_dirs: list[str] = []  # real paths of directories whose listing was empty

    def scan_root(self, root: Path) -> None:
        root = Path(os.path.abspath(os.path.expanduser(root)))
        try:
            st = root.stat()
        except FileNotFoundError:
            reason = "broken symbolic link" if root.is_symlink() else "no such file or directory"
            self.problems.append(ScanProblem(root, reason))
            return
        except OSError as e:
            self.problems.append(ScanProblem(root, _reason(e), unread=True))
            return
        if stat.S_ISDIR(st.st_mode):
            self._walk(root, root, (), st)
        elif stat.S_ISREG(st.st_mode):
            self._add_file(root, os.path.realpath(root), st)  # named explicitly: any extension
        else:
            self.problems.append(ScanProblem(root, "not a regular file or directory"))

    def _walk(self, directory: Path, root: Path, ancestors: tuple[tuple[int, int], ...], st: os.stat_result) -> None:
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
            self.problems.append(ScanProblem(directory, "symbolic link loop (points back to a parent directory)"))
            return
        if key in self.scanned_dirs:
            return  # reached again through another link: already scanned
        self.scanned_dirs.add(key)
        real_dir = os.path.realpath(directory)
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            self.problems.append(ScanProblem(directory, f"cannot read directory: {_reason(e)}", unread_dir=True))
            return
        if not children:
            self.empty_dirs.append(real_dir)
        ancestors = ancestors + (key,)
        for child in children:
            path = directory / child.name
            if self._excluded(child.name, path, root):
                continue
            try:
                is_link = child.is_symlink()
                child_st = child.stat(follow_symlinks=True)
            except FileNotFoundError:
                self.problems.append(ScanProblem(path, "broken symbolic link"))
                continue
            except OSError as e:
                self.problems.append(ScanProblem(path, _reason(e), unread=True))
                continue
            if stat.S_ISDIR(child_st.st_mode):
                if is_link:
                    self.linked_dirs.append(os.path.realpath(path))
                self._walk(path, root, ancestors, child_st)
            elif stat.S_ISREG(child_st.st_mode):
                if _extension(child.name) not in self.extensions:
                    continue
                resolved = os.path.realpath(path) if is_link else os.path.join(real_dir, child.name)
                self._add_file(path, resolved, child_st)

    def _add_file(self, path: Path, resolved: str, st: os.stat_result) -> None:
        try:
            resolved.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the name: the index stores UTF-8 text
            # the exact name (surrogate-escaped) is kept; JSON reports add its bytes as `path_bytes`
            self.problems.append(ScanProblem(path, "file name is not valid UTF-8; rename the file to index it"))
            return
        if not os.access(resolved, os.R_OK):
            self.problems.append(ScanProblem(path, "permission denied", unread=True))
            return
        if resolved not in self.entries:
            self.entries[resolved] = ScanEntry(Path(resolved), st.st_size, st.st_mtime_ns)

    def _excluded(self, name: str, path: Path, root: Path) -> bool:
        return bool(self.exclude) and matches_exclude(name, path.relative_to(root).as_posix(), str(path),
                                                      self.exclude)


def matches_exclude(name: str, relative: str, absolute: str, patterns: Iterable[str]) -> bool:
    """The --exclude rule: a glob matches a file or folder by its name, its path relative to the scanned
    root, or its absolute path."""
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(absolute, p)
               for p in patterns)


def _extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def _reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return error.strerror or str(error)


def audio_files(paths: Iterable[str], problems: list | None = None,
                shown: Callable[[str], str] = str) -> list[str]:
    """The files named by `paths` (`clap tag`, the MCP `tag` tool): each file as given, each folder walked as `clap
    index` walks it (audio extensions, symbolic links followed, sorted), its files named under the folder as given.
    A path that does not exist, or a folder without audio files, is a UsageError naming it through `shown`;
    folders that cannot be read go to `problems` (when given)."""
    from ..errors import UsageError

    files: list[str] = []
    for given in paths:
        if not os.path.lexists(given):
            raise UsageError(f"{shown(given)}: no such file or directory")
        if not os.path.isdir(given):
            files.append(given)
            continue
        base = Path(given).resolve()
        found = list(scan([given], problems=problems))
        if not found:
            raise UsageError(f"{shown(given)}: no audio files in this folder")
        for entry in found:
            try:
                files.append(os.path.join(given, entry.path.relative_to(base)))
            except ValueError:  # reached through a symbolic link that leads out of the folder
                files.append(str(entry.path))
    return files
