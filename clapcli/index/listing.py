"""The indexes under $CLAP_HOME/indexes, described as `clap index list` shows them (and as `clap mcp`'s `indexes`
tool returns them), and what clap itself keeps in an index directory.

Nothing here imports torch or the model: each store is opened read-only, like `clap search`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ClapError, IndexStoreError
from .paths import indexes_dir
from .schema import DB_FILENAME


def named_indexes() -> list[Path]:
    """The directories under $CLAP_HOME/indexes that hold an index database, sorted."""
    root = indexes_dir()
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and (d / DB_FILENAME).is_file())


def describe_index(index_dir: Path) -> dict:
    """One row of `clap index list` (stable keys; `error` says why files/model are unknown)."""
    from .exclusions import remembered_excludes
    from .store import IndexStore
    from .tag_store import tag_sets, tagged_counts

    row = {"name": index_dir.name, "path": str(index_dir), "files": None, "size_bytes": disk_size(index_dir),
           "model": None, "roots": None, "excludes": None, "tag_sets": None, "error": None}
    if not IndexStore.exists(index_dir):
        row["error"] = "no database"
        return row
    try:
        with IndexStore.open(index_dir, readonly=True) as store:
            row["files"] = store.counts().ok_files
            row["model"] = (store.model_identity or {}).get("model")
            row["roots"] = store.roots()
            row["excludes"] = remembered_excludes(store)
            tagged = tagged_counts(store)
            row["tag_sets"] = [{**s.to_dict(), "files": tagged.get(s.id, 0)} for s in tag_sets(store)]
    except ClapError as e:
        row["error"] = str(e)
    return row


def disk_size(directory: Path) -> int:
    """Bytes of the index's own files (not of anything else in its folder)."""
    total = 0
    for entry in own_entries(directory) if directory.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            paths = [os.path.join(base, f) for base, _dirs, files in os.walk(entry) for f in files]
        else:
            paths = [entry]
        for path in paths:
            try:
                total += os.lstat(path).st_size
            except OSError:
                pass
    return total


def own_entries(index_dir: Path) -> list[Path]:
    """What clap itself keeps in an index directory (see index/store.py): nothing else is touched."""
    from .ann import ANN_FILENAME, SIDECAR_FILENAME
    from .indexer import REBUILD_DIR
    from .lock import GRAPH_LOCK_FILE, LOCK_FILE, LOCK_PID_FILE
    from .schema import PARTITIONS_DIR

    names = {ANN_FILENAME, SIDECAR_FILENAME, LOCK_PID_FILE, REBUILD_DIR, LOCK_FILE, GRAPH_LOCK_FILE, PARTITIONS_DIR}
    temps = tuple(f"{n}." for n in names)  # atomic.temp_path names beside them, left by a killed writer
    return [p for p in index_dir.iterdir() if p.name in names or p.name.startswith(DB_FILENAME)
            or (p.name.startswith(temps) and p.name.endswith(".tmp"))]


def open_searchable(index: str | None, index_dir: Path):
    """The index opened read-only for searching (`clap search`'s rule): a missing named (or the default) index is
    refused with the names there are, the close one first."""
    from .search import open_for_search
    from .store import IndexStore

    if not IndexStore.exists(index_dir) and index_dir.parent == indexes_dir():
        import difflib

        names = [d.name for d in named_indexes()]
        if names:
            close = difflib.get_close_matches(index_dir.name, names, n=1, cutoff=0.6) if index else []
            guess = f"; did you mean {close[0]}?" if close else ";"
            raise IndexStoreError(f"no index at {index_dir}{guess} the indexes are: {', '.join(names)} "
                                  "(`clap index list` shows them)")
    return open_for_search(index_dir)
