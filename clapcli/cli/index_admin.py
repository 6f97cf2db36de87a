"""`clap index list` and `clap index rm NAME`: see and remove the indexes under $CLAP_HOME/indexes.

`clap index DIR…` takes folders as arguments, so these are reached through `dispatch`: a first argument
`list` or `rm` that is not an existing path runs the subcommand (`clap index ./list` indexes a folder
named `list`). Nothing here imports torch: listing opens each store read-only, like `clap search`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import typer

from . import output

SUBCOMMANDS = ("list", "rm")

admin_app = typer.Typer(help="Manage indexes: list them, remove one.", no_args_is_help=True)


def dispatch(args) -> Optional[object]:
    """The click command that should handle `clap index ARGS…`, or None for the indexing command itself."""
    args = list(args)
    if not args or args[0] not in SUBCOMMANDS or os.path.lexists(args[0]):
        return None
    return typer.main.get_command(admin_app)


@admin_app.command("list")
def list_indexes(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """The indexes under $CLAP_HOME/indexes: name, path, files, size on disk, model, folders indexed, globs skipped,
    tag sets."""
    rows = [_describe(d) for d in named_indexes()]
    if as_json or not output.is_terminal():
        for r in rows:
            output.json_line(r)
        return
    if not rows:
        from ..index.paths import indexes_dir

        output.stderr_console().print(f"no indexes in {output.literal(indexes_dir())}; build one with `clap index DIR`",
                                      highlight=False, soft_wrap=True)
        return
    print_index_list(output.stdout_console(), rows)


def print_index_list(con, rows: list[dict]) -> None:
    """One block per index rather than a table: paths and model paths print whole, never folded mid-word."""
    for r in rows:
        con.print(f"[bold]{output.literal(r['name'])}[/]  {_count(r)}, {human_size(r['size_bytes'])}", highlight=False)
        con.print(f"  path   {output.literal(r['path'])}", highlight=False, soft_wrap=True)
        if r["error"] is None:
            con.print(f"  model  {output.literal(r['model'] or '(none yet)')}", highlight=False, soft_wrap=True)
            for root in r.get("roots") or []:
                con.print(f"  folder {output.literal(root)}", highlight=False, soft_wrap=True)
            for pattern in r.get("excludes") or []:
                con.print(f"  skips  {output.literal(pattern)}", highlight=False, soft_wrap=True)
            for s in r.get("tag_sets") or []:
                how = "zero-shot" if s["kind"] == "zero-shot" else f"classifier {s['classifier']}"
                con.print(f"  tags   {s['id']}: {output.literal(s['name'])} ({output.literal(how)}, "
                          f"{output.plural(s['labels'], 'label')}, top {s['top_k']}), "
                          f"{output.plural(s['files'], 'file')} tagged", highlight=False, soft_wrap=True)
        else:
            con.print(f"  [red]{output.literal(r['error'])}[/]", highlight=False, soft_wrap=True)


@admin_app.command("rm")
def remove_index(
    name: str = typer.Argument(..., metavar="NAME", help="Index name (see `clap index list`) or directory.",
                               show_default=False),
    yes: bool = typer.Option(False, "--yes", "-y", help="Remove without asking."),
) -> None:
    """Remove an index: its database, hnswlib graph and lock files (refused while `clap index` writes it).

    Only the index's own files go: a named index under $CLAP_HOME is clap's whole folder, but an index that is
    a symbolic link loses its own files and the link, never what else the folder it points to holds."""
    from ..errors import ClapError, IndexStoreError, UsageError
    from ..index.lock import WriterLock, lock_holder_pid
    from ..index.paths import indexes_dir, resolve_index
    from ..index.schema import DB_FILENAME

    index_dir = resolve_index(name)
    named = index_dir.parent == indexes_dir()
    linked = index_dir.is_symlink()  # its folder is someone else's: never removed, nor recursed through
    if not (index_dir / DB_FILENAME).is_file() and not (named and index_dir.is_dir()):
        raise ClapError(f"no index {name!r} at {index_dir}; `clap index list` shows the indexes")
    info = _describe(index_dir)
    what = output.display_path(f"index {name} at {index_dir} ({_count(info)}, {human_size(info['size_bytes'])})")

    def take_lock() -> WriterLock:
        try:
            return WriterLock(index_dir, wait=False).acquire()
        except IndexStoreError:
            pid = lock_holder_pid(index_dir)
            raise IndexStoreError(f"index {name} at {index_dir} is being written by `clap index` "
                                  f"(pid {pid if pid is not None else 'unknown'}); nothing removed, "
                                  "try again when it is done") from None

    if not yes:
        take_lock().release()  # refuse before asking; the lock is not held while the question waits
        if not _stdin_is_terminal():
            raise UsageError(f"not removing {what} without confirmation: pass --yes")
        if not typer.confirm(f"remove {what}?", default=False):
            output.stderr_console().print("nothing removed", highlight=False)
            raise typer.Exit(1)
    lock = take_lock()
    try:
        left = _remove(index_dir, whole=named and not linked)
    finally:
        lock.release()
    if linked:
        target = os.path.realpath(index_dir)
        index_dir.unlink()
        output.stderr_console().print(
            output.display_path(f"removed {what} and the link {index_dir}; kept {target}, which it pointed to, "
                                f"with its {len(left)} other entries"), markup=False, highlight=False, soft_wrap=True)
        return
    if not left:
        try:
            index_dir.rmdir()
        except OSError:
            pass  # e.g. recreated by a writer that started meanwhile
    kept = f"; kept {len(left)} other entries in {index_dir}" if left else ""
    output.stderr_console().print(f"removed {what}{kept}", markup=False, highlight=False, soft_wrap=True)


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return ""  # unreachable


def named_indexes() -> list[Path]:
    from ..index.listing import named_indexes

    return named_indexes()


def _describe(index_dir: Path) -> dict:
    from ..index.listing import describe_index

    return describe_index(index_dir)


def _count(info: dict) -> str:
    return "unreadable" if info["files"] is None else output.plural(info["files"], "file")


def _own_entries(index_dir: Path) -> list[Path]:
    from ..index.listing import own_entries

    return own_entries(index_dir)


def _remove(index_dir: Path, whole: bool) -> list[Path]:
    """Delete the index files (everything, for a named index under $CLAP_HOME); returns what is left."""
    entries = list(index_dir.iterdir()) if whole else _own_entries(index_dir)
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return list(index_dir.iterdir())
