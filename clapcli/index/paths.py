"""Where indexes live.

An index is a directory. `resolve_index` maps the `--index NAME|PATH` option to it: nothing means the
default index, a bare name means a named index under `<clap_home>/indexes/`, anything that looks like a
path is used as given. (The one-writer lock of an index directory is in lock.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import IndexStoreError, UsageError
from ..home import clap_home

DEFAULT_INDEX_NAME = "default"


def indexes_dir() -> Path:
    """The directory that holds the named indexes."""
    return clap_home() / "indexes"


def resolve_index(name_or_path: str | os.PathLike | None) -> Path:
    """The directory of an index: None → the default index, a bare name → a named index, else a path.

    A bare name has no path separator and does not start with "." or "~" (so `.`, `..`, `./x` and `~/x`
    are paths). Paths are made absolute but symlinks are kept as given.
    """
    if name_or_path is None:
        return indexes_dir() / DEFAULT_INDEX_NAME
    text = os.fspath(name_or_path)
    if not text:
        raise UsageError("empty index name; pass a name or a directory to --index")
    separators = {os.sep} | ({os.altsep} if os.altsep else set())
    is_bare_name = not any(s in text for s in separators) and not text.startswith((".", "~"))
    if isinstance(name_or_path, os.PathLike) or not is_bare_name:
        return Path(os.path.abspath(Path(text).expanduser()))
    return indexes_dir() / text


def check_remembered_model(model: str | None, index_dir: Path, advice: str) -> None:
    """Raise IndexStoreError when `model`, the load reference an index remembers, is a local path that no
    longer exists (a moved or deleted model folder): the message names it and ends with `advice`, how the
    calling command takes the new place.

    Hub ids and registry names are left to the loader (they are not paths on this machine).
    """
    if not model or not os.path.isabs(os.path.expanduser(model)) or os.path.exists(os.path.expanduser(model)):
        return
    raise IndexStoreError(
        f"index {index_dir} was built with the model at {model}, which no longer exists (moved or deleted?); "
        f"{advice} (the same weights in another folder are accepted)"
    )


def folder_in_index(path: str, roots: list[str]) -> str:
    """The folder of an indexed file relative to the indexed folder (root) that holds it: `sfx/impacts`, `.` for
    the root itself; with several roots, led by the root's name. The full folder when no root holds it."""
    folder = os.path.dirname(path)
    holders = [r for r in roots if folder == r or folder.startswith(r.rstrip(os.sep) + os.sep)]
    if not holders:
        return folder
    root = max(holders, key=len)
    relative = os.path.relpath(folder, root)
    if len(roots) == 1:
        return relative
    name = os.path.basename(root.rstrip(os.sep)) or root
    return name if relative == "." else os.path.join(name, relative)
