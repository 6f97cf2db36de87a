"""The --exclude globs an index remembers (table `excludes`, schema 5).

`clap index --exclude '*.mp3'` removes the indexed matches and keeps skipping them on every later run, with or
without --exclude, until `--forget-exclude '*.mp3'` drops the pattern (the next run then indexes those files
again). A `--rebuild` keeps them too. `IndexStore` holds the store's SQL in store.py, which is at its size
limit; the reads and writes of this one table live here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from ..errors import IndexStoreError, UsageError
from .store import IndexStore


def remembered_excludes(store: IndexStore) -> list[str]:
    """The globs the index skips, in the order they were first given."""
    rows = store._conn.execute("SELECT pattern FROM excludes ORDER BY added_at, pattern")  # noqa: SLF001
    return [row[0] for row in rows]


def remember_excludes(store: IndexStore, patterns: Sequence[str]) -> None:
    """Make `patterns` the globs the index remembers (those not in it are forgotten; known ones keep their age)."""
    conn = store._conn  # noqa: SLF001 - see the module docstring
    with store.transaction():
        known = remembered_excludes(store)
        conn.executemany("DELETE FROM excludes WHERE pattern = ?", [(p,) for p in known if p not in patterns])
        now = time.time()
        conn.executemany("INSERT INTO excludes (pattern, added_at) VALUES (?, ?)",
                         [(p, now + i * 1e-6) for i, p in enumerate(dict.fromkeys(patterns)) if p not in known])


def stored_excludes(index_dir: Path, rebuild: bool) -> list[str]:
    """The globs the index in `index_dir` remembers; [] for a new index, or a damaged one that `rebuild` replaces."""
    if not IndexStore.exists(index_dir):
        return []
    try:
        with IndexStore.open(index_dir, readonly=True) as store:
            return remembered_excludes(store)
    except IndexStoreError:
        if rebuild:
            return []
        raise


def excludes_in_effect(remembered: Sequence[str], given: Sequence[str], forget: Sequence[str],
                       index_dir: Path) -> list[str]:
    """The globs this run skips: the remembered ones and those `given`, less the ones to `forget`; a pattern to
    forget that the index does not remember (nor is given this run) is refused, naming the ones it has."""
    patterns = list(dict.fromkeys([*remembered, *given]))
    unknown = [p for p in forget if p not in patterns]
    if unknown:
        known = ", ".join(repr(p) for p in remembered) or "none"
        raise UsageError(f"--forget-exclude {unknown[0]!r}: not a pattern index {index_dir} excludes "
                         f"(it excludes {known})")
    return [p for p in patterns if p not in forget]
