"""`clap dedupe`: groups of indexed files that hold the same recording, each with a suggested keeper.

Reads the index and the audio; never deletes or moves anything (`--paths` prints the copies for a pipe).
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from . import output
from .index import INDEX


def dedupe_command(
    index: Optional[str] = INDEX,
    threshold: Optional[float] = typer.Option(
        None, "--threshold", "-t", min=-1.0, max=1.0, show_default="0.9",
        help="Cosine of two files' stored vectors from which their audio is compared. Lower finds copies the "
        "model placed further apart, at the cost of more files decoded."),
    k: int = typer.Option(10, "-k", "--neighbours", min=1, help="Nearest neighbours looked at per file."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per group: keeper {path, format, "
                                 "sample_rate, bit_depth, channels, duration}, why, duplicates [{path, …, "
                                 "similarity, cosine}], score."),
    paths: bool = typer.Option(False, "--paths", help="Print the copies that are not the keeper, one path per "
                               "line (for piping; nothing is deleted)."),
    null: bool = typer.Option(False, "--null", "-0", help="As --paths, each path ended by NUL (for `xargs -0`)."),
) -> None:
    """List groups of files holding the same recording (another format, rate, depth, gain or trimmed silence)."""
    from ..errors import UsageError
    from ..index.paths import resolve_index
    from ..index.search import open_for_search
    from ..library.dedupe import DEFAULT_THRESHOLD, find_duplicates

    paths = paths or null
    if as_json and paths:
        raise UsageError(f"choose one of --json and {'-0' if null else '--paths'}")
    index_dir = resolve_index(index)
    with open_for_search(index_dir) as store:
        bar = output.ProgressBar("comparing audio", unit="pairs")
        with bar:
            def progress(done: int, total: int) -> None:
                bar.start(total)
                bar.advance()

            found = find_duplicates(store, DEFAULT_THRESHOLD if threshold is None else threshold, k, progress)
        roots = store.roots()
    err = output.stderr_console()
    for path in found.missing:
        err.print(f"missing on disk (indexed, not compared): {output.literal(path)}", highlight=False)
    for path, reason in found.unreadable:
        err.print(f"cannot decode, not compared: {output.literal(path)}: {output.literal(reason)}", highlight=False)
    if paths:
        escaped = sum(output.write_path(d.facts.path, null) for g in found for d in g.duplicates)
        sys.stdout.flush()
        if escaped:
            print(f"warning: {escaped} path(s) hold control characters (such as a newline) and are printed "
                  "escaped, so they name no file; use -0 (with xargs -0) for exact paths", file=sys.stderr)
    elif as_json or not output.is_terminal():
        for group in found:
            output.json_line(group.to_dict())
    else:
        _table(found, roots)


def _table(found, roots: list[str]) -> None:
    """Each group on a terminal: the keeper first with why, then its copies with their audio-match score."""
    from rich.table import Table

    from .search import folder_in_index

    con = output.stdout_console()
    if not found:
        con.print(f"no duplicates ({output.plural(found.checked, 'pair')} of files compared)")
        return
    copies = sum(len(g.duplicates) for g in found)
    title = (f"{output.plural(len(found), 'group')} of duplicates: {output.plural(copies, 'copy', 'copies')} "
             "beside the keepers")
    captions = [f"folders relative to {output.literal(roots[0])}"] if len(roots) == 1 else []
    table = Table(title=title, caption="\n".join(captions + ["nothing was deleted: `--paths` lists the copies"]),
                  show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("", no_wrap=True)
    table.add_column("file (folder)", overflow="fold", ratio=3)
    table.add_column("format", overflow="fold", ratio=1)
    table.add_column("length", justify="right", no_wrap=True)
    table.add_column("match", justify="right", no_wrap=True)
    for number, group in enumerate(found, 1):
        rows = [("keep", group.keeper, "", group.why)] + [
            ("copy", d.facts, f"{d.similarity:.3f}", "") for d in group.duplicates]
        for n, (role, facts, score, why) in enumerate(rows):
            folder = folder_in_index(facts.path, roots)
            name = output.literal(os.path.basename(facts.path)) + (
                "" if folder == "." else f"\n[dim]{output.literal(folder)}[/]") + (
                f"\n[italic]{output.literal(why)}[/]" if why else "")
            table.add_row(str(number) if n == 0 else "", role, name, _format(facts), output.clock(facts.duration),
                          score)
    con.print(table)


def _format(facts) -> str:
    """`FLAC 48 kHz 24-bit stereo`."""
    rate = f"{facts.sample_rate / 1000:g} kHz"
    depth = f" {facts.bit_depth}-bit" if facts.bit_depth else ""
    channels = {1: "mono", 2: "stereo"}.get(facts.channels, f"{facts.channels} ch")
    return f"{facts.format} {rate}{depth} {channels}"


def register(app: typer.Typer) -> None:
    app.command("dedupe")(dedupe_command)
