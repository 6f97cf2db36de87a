"""`clap search`: text or example audio → the best-matching files of an index."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import options, output
from .index import INDEX


def search_command(
    query: Optional[List[str]] = typer.Argument(None, help="Text query; several terms add up.", show_default=False),
    audio: Optional[List[Path]] = typer.Option(None, "--audio", "-a", help="Query by example: an audio file "
                                               "(repeatable)."),
    negative: Optional[List[str]] = typer.Option(None, "--not", "-n", help="Push results away from this text "
                                                 "(repeatable)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="Number of files to return."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results below this cosine score."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: rank, score, path, start, end, "
                                 "duration."),
    paths: bool = typer.Option(False, "--paths", help="Print matching paths only (for piping)."),
    index: Optional[str] = INDEX,
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Must match the index's model (default: the model that built it)."),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    tokenizer: Optional[str] = options.TOKENIZER,
) -> None:
    """Search an index with text (and/or --audio FILE); results are files ranked by their best segment."""
    from ..errors import UsageError
    from ..index.paths import check_remembered_model, resolve_index
    from ..index.search import model_mismatch_advice, moved_model_advice, open_for_search, query_vector, search

    for text in (query or []) + (negative or []):
        if not text.strip():
            raise UsageError("empty query: give words to search for (or --audio FILE)")
    for a in audio or []:  # before the model loads: a typo fails at once
        if not a.exists():
            raise UsageError(f"--audio {output.display_path(a)}: no such file")
        if not a.is_file():
            raise UsageError(f"--audio {output.display_path(a)}: not a file")
    if as_json and paths:
        raise UsageError("choose one of --json and --paths")
    if not query and not audio:
        raise UsageError("nothing to search for: give a text query and/or --audio FILE")
    index_dir = resolve_index(index)
    with open_for_search(index_dir) as store:
        identity = store.model_identity or {}
        if model is None:
            check_remembered_model(identity.get("model"), index_dir, moved_model_advice(index))
        m = options.load(model or identity.get("model"), device, precision, tokenizer)
        wanted = m.identity_dict
        store.check_model_identity(wanted, advice=model_mismatch_advice(index, wanted.get("model"), model is not None))
        q = query_vector(m, query or [], negative or [], [str(a) for a in audio or []])
        hits = search(store, q, k=k, min_score=min_score)
    if paths:
        for h in hits:
            print(h.path)
    elif as_json or not output.is_terminal():
        for h in hits:
            output.json_line(h.to_dict())
    else:
        _table(hits, " + ".join((query or []) + [str(a) for a in audio or []]), negative or [])


def _table(hits, title: str, negative) -> None:
    from rich.table import Table

    if negative:
        title += "  (not: " + ", ".join(negative) + ")"
    table = Table(title=title)
    for col, justify in (("#", "right"), ("score", "right"), ("path", "left"), ("at", "right"),
                         ("duration", "right")):
        table.add_column(col, justify=justify)
    for h in hits:
        at = f"{_clock(h.start)}–{_clock(h.end)}" if h.start is not None else ""
        table.add_row(str(h.rank), f"{h.score:.3f}", h.path, at, _clock(h.duration) if h.duration else "")
    output.stdout_console().print(table if hits else "no results")


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return ""
    m, s = divmod(seconds, 60)
    return f"{int(m)}:{s:04.1f}"


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
