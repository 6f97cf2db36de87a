"""Atomic file and directory writes: a reader sees the old content or the new, never a half-written file.

    atomic_write(path, b"...")                       # bytes, or str (UTF-8)
    atomic_write(path, writer=hnsw.save_index)       # a library that writes a file itself, given a path
    with atomic_directory(run_dir / "step-100") as tmp:
        save_checkpoint(tmp)                         # replaces step-100/ only once everything is written

Files go to a temporary name in the target's own directory (same filesystem, so the rename is atomic),
are fsynced, renamed over the target with `os.replace`, and the directory is fsynced so the rename
survives a power cut. On any failure, KeyboardInterrupt included, the temporary is removed and the
target is left as it was. Temporary names are `<name>.<pid>.<8 hex>.tmp`. A writer that appends its own
suffix to a path (`np.save` adds `.npy`) should be handed an open file instead, as `write_npy` does for
numpy arrays. A writer killed mid-write (SIGKILL) leaves its temporary
behind; `remove_stale_temps` clears them for a caller that knows no other writer is running.

An existing empty directory that cannot be renamed (a mount point: `rename` fails with EBUSY) is filled in
place instead, with `fill_directory`: the content is written in a temporary folder inside it and its entries
are moved up one by one, the `last` ones (the file that marks the content complete) last.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_write", "atomic_directory", "fill_directory", "is_fill_temp", "old_path", "remove_stale_temps",
           "temp_path", "LEFTOVER"]

FILL_TEMP = ".clapcli-fill"  # the temporary folder `fill_directory` writes in: FILL_TEMP.<pid>.<hex>.tmp


def temp_path(target: str | os.PathLike) -> Path:
    """A fresh temporary name beside `target` (not created)."""
    target = Path(target)
    return target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def old_path(target: str | os.PathLike) -> Path:
    """A fresh name beside `target` for the previous directory that `atomic_directory` sets aside."""
    target = Path(target)
    return target.with_name(f"{target.name}.{os.getpid()}.{secrets.token_hex(4)}.old")


LEFTOVER = re.compile(r"(?P<name>.+)\.\d+\.[0-9a-f]{8}\.(?P<kind>tmp|old)")  # names from temp_path / old_path


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str | None = None,
    *,
    writer: Callable[[Path], object] | None = None,
) -> Path:
    """Replace `path` with `data`, or with what `writer(temp_path)` writes to the path it is given.

    Exactly one of `data` and `writer` is given. A new file gets the usual permissions (0666 less the
    umask), not the 0600 of `tempfile`. Returns `path` as a Path.
    """
    if (data is None) == (writer is None):
        raise TypeError("atomic_write takes exactly one of data and writer")
    target = Path(path)
    tmp = temp_path(target)
    try:
        if writer is None:
            payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        else:
            writer(tmp)
            if not tmp.is_file():
                raise OSError(f"the writer for {target} wrote no file at {tmp}")
            _fsync_path(tmp)
        os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(target.parent)
    return target


def write_npy(path: str | os.PathLike, array) -> Path:
    """`atomic_write` of a numpy array as a `.npy` file (plain data: object arrays are refused, never pickled).
    np.save is handed an open file, so it keeps the temporary name as it is (given a path, it appends .npy)."""
    import numpy as np

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)

    return atomic_write(path, writer=save)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `path`; on success it becomes `path`.

    Everything written inside is fsynced, then the directory is renamed to `path`. An existing `path`
    is replaced only at that moment: it is renamed aside to `<name>.<pid>.<hex>.old`, the new one renamed in, the
    old one deleted. (POSIX has no atomic swap of two directories; a crash between the two renames
    leaves the old directory under that `.old` name, never a half-written `path`.) On failure the
    temporary directory is deleted and `path` is untouched.
    """
    target = Path(path)
    tmp = temp_path(target)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists() or target.is_symlink():
            old = old_path(target)
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old, target)  # put the previous one back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            _remove(old)


@contextmanager
def fill_directory(path: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory inside the existing, empty directory `path`; on success its entries
    move up into `path`, the names in `last` after every other one.

    For a directory that cannot be replaced by a rename, such as a mount point. Everything is fsynced before
    the first move; each move is a rename within one filesystem. On failure what was moved is removed again
    and `path` is left empty, as found. Temporaries left by killed writers (see `is_fill_temp`) are removed
    first.
    """
    target = Path(path)
    for stale in target.iterdir():
        if is_fill_temp(stale.name) and not _pid_alive(int(stale.name.split(".")[-3])):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_path(target / FILL_TEMP)
    tmp.mkdir()
    moved: list[Path] = []
    try:
        yield tmp
        _fsync_tree(tmp)
        ordered = sorted(e for e in tmp.iterdir() if e.name not in last)
        ordered += [tmp / name for name in last if (tmp / name).exists()]
        for entry in ordered:
            os.replace(entry, target / entry.name)
            moved.append(target / entry.name)
        tmp.rmdir()
    except BaseException:
        for p in moved:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else _remove(p)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(target)


def is_fill_temp(name: str) -> bool:
    """Whether `name` is the temporary folder of a `fill_directory` (its own or a killed writer's)."""
    return re.fullmatch(re.escape(FILL_TEMP) + r"\.\d+\.[0-9a-f]{8}\.tmp", name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def remove_stale_temps(path: str | os.PathLike) -> int:
    """Delete temporaries of `path` left by killed writers; call only while no other writer can run.

    Returns how many were removed.
    """
    target = Path(path)
    pattern = re.compile(re.escape(target.name) + r"\.\d+\.[0-9a-f]{8}\.tmp")
    removed = 0
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return 0
    for stale in siblings:
        if not pattern.fullmatch(stale.name):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            _remove(stale)
        removed += 1
    return removed


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    """Every file and folder under `directory` on disk (before it is renamed into place)."""
    for root, _dirs, files in os.walk(directory):
        for name in files:
            _fsync_path(Path(root) / name)
        _fsync_dir(Path(root))


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
