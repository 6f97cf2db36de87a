"""`clap search`: text or example audio → the best-matching files of an index.

A text search runs the model's saved query graph (`clapcli.models.onnx_text`, written by `clap index`) without
importing torch; where none is saved (or --engine torch, a GPU, another precision) it loads the text half of the
model (`load_model(..., text_only=True)`). `--stdin` loads either once and answers one query per input line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import options, output
from .index import INDEX


def search_command(
    query: Optional[List[str]] = typer.Argument(
        None, metavar="QUERY", show_default=False,
        help="What to search for: the words are one query, as in any search box (`clap search metal impact`). "
        "A lone + adds another query (`metal impact + glass`), a lone - pushes one away (`rain - thunder`, as "
        "--not). An existing audio file searches by example (as --audio).",
    ),
    audio: Optional[List[Path]] = typer.Option(None, "--audio", "-a", help="Query by example: an audio file "
                                               "(repeatable)."),
    negative: Optional[List[str]] = typer.Option(None, "--not", "-n", help="Push results away from this text "
                                                 "(repeatable)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="Number of files to return."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results below this cosine score."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: rank, score, path, start, end, "
                                 "duration, and query (how the query was read: text, not, audio)."),
    paths: bool = typer.Option(False, "--paths", help="Print matching paths only (for piping); a name holding a "
                               "control character (a newline) is printed escaped, with a warning: use -0."),
    null: bool = typer.Option(False, "--null", "-0", help="Print matching paths ended by NUL, as they are on disk "
                              "(implies --paths; for `xargs -0`)."),
    index: Optional[str] = INDEX,
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Must match the index's model (default: the model that built it)."),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    tokenizer: Optional[str] = options.TOKENIZER,
    stdin: bool = typer.Option(False, "--stdin", help="Load the model once, then answer one query per line of "
                               "standard input: plain text, or JSON with a 'query' and an optional 'k'."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Only files tagged with this label (repeatable: all "
                                            "of them), as `clap tag --index` stored them."),
    not_tag: Optional[List[str]] = typer.Option(None, "--not-tag", help="Leave out files tagged with this label "
                                                "(repeatable)."),
    tag_set: Optional[str] = typer.Option(None, "--tag-set", help="The tag set (id or name, see `clap index list`) "
                                          "--tag, --not-tag and --json's tags read (default: every set of the index)."),
) -> None:
    """Search an index with text (and/or --audio FILE); results are files ranked by their best segment."""
    from ..errors import UsageError
    from ..identity import same_model
    from ..index.paths import check_remembered_model, resolve_index
    from ..index.query import read_query, torch_free_query
    from ..index.search import Searcher, model_mismatch_advice, moved_model_advice, query_vector

    read = read_query(query or [], negative or [], [str(a) for a in audio or []])
    for path in read.audio[len(audio or []):]:
        output.stderr_console().print(f"searching by example: {output.literal(path)} is an audio file (as with "
                                      "--audio)", highlight=False)
    query, negative, audio = read.text, read.negative, [Path(a) for a in read.audio]
    for a in audio:  # before the model loads: a typo fails at once
        if not a.exists():
            raise UsageError(f"--audio {output.display_path(a)}: no such file")
        if not a.is_file():
            raise UsageError(f"--audio {output.display_path(a)}: not a file")
    paths = paths or null
    if as_json and paths:
        raise UsageError(f"choose one of --json and {'-0' if null else '--paths'}")
    if stdin and (query or audio):
        raise UsageError("--stdin reads the queries from standard input; give no QUERY or --audio with it")
    if not query and not audio and not stdin:
        raise UsageError("nothing to search for: give a text query and/or --audio FILE")
    index_dir = resolve_index(index)
    with _open_index(index, index_dir) as store:
        identity = store.model_identity or {}
        if model is None:
            check_remembered_model(identity.get("model"), index_dir, moved_model_advice(index))
        m = torch_free_query(model or identity.get("model"), audio, device, precision, tokenizer, engine)
        if m is not None and identity and not same_model(identity, m.identity_dict):
            m = None  # a graph saved under other settings: the model decides (and explains a real mismatch)
        if m is None:
            m = options.load(model or identity.get("model"), device, precision, tokenizer, text_only=not audio,
                             engine=engine)
        wanted = m.identity_dict
        store.check_model_identity(wanted, advice=model_mismatch_advice(index, wanted.get("model"), model is not None))
        note = _precision_note(store.precisions, getattr(m, "precision", None))
        sets, keep = _tag_choice(store, tag or [], not_tag or [], tag_set)
        searcher = Searcher(store, keep=keep)
        if stdin:
            failed = _answer_stdin(m, searcher, negative or [], k, min_score, as_json, paths, null, note, sets)
            if failed:
                raise typer.Exit(1)
            return
        q = query_vector(m, query, negative, read.audio)
        hits = searcher.search(q, k=k, min_score=min_score)
        roots = store.roots()
        results = _with_tags(store, hits, sets)
    if paths:
        _print_paths([h.path for h in hits], null)
    elif as_json or not output.is_terminal():
        for result in results:
            output.json_line({**result, "query": read.to_dict()})
    else:
        _table(hits, " + ".join(query + read.audio), negative, note, roots)


def _open_index(index: str | None, index_dir: Path):
    """The index opened for searching; a missing named (or the default) index is refused with the names there
    are, and the close one first."""
    from ..errors import IndexStoreError
    from ..index.paths import indexes_dir
    from ..index.search import open_for_search
    from ..index.store import IndexStore

    if not IndexStore.exists(index_dir) and index_dir.parent == indexes_dir():
        import difflib

        from .index_admin import named_indexes

        names = [d.name for d in named_indexes()]
        if names:
            close = difflib.get_close_matches(index_dir.name, names, n=1, cutoff=0.6) if index else []
            guess = f"; did you mean {close[0]}?" if close else ";"
            raise IndexStoreError(f"no index at {index_dir}{guess} the indexes are: {', '.join(names)} "
                                  "(`clap index list` shows them)")
    return open_for_search(index_dir)


def _tag_choice(store, tags: list[str], not_tags: list[str], choice: str | None):
    """(the tag sets in use, the `keep` test of --tag/--not-tag or None) for this index."""
    from ..index.tag_store import choose_tag_sets, tag_filter

    sets = choose_tag_sets(store, choice)
    return sets, tag_filter(store, tags, not_tags, sets)


def _with_tags(store, hits, sets) -> list[dict]:
    """The hits' --json objects; with `sets` (the index holds tags), each with its "tags": label, score (the
    probability stored by `clap tag --index`) and set (its name), by set and best first."""
    from ..index.tag_store import tags_by_path

    if not sets:
        return [h.to_dict() for h in hits]
    found = tags_by_path(store, [h.path for h in hits], sets)
    return [{**h.to_dict(), "tags": [{"label": label, "score": round(score, 6), "set": name}
                                     for label, score, name in found.get(h.path, [])]} for h in hits]


def _answer_stdin(m, searcher, negative, k, min_score, as_json, paths, null, note, sets=()) -> int:
    """One result set per query line, flushed as it is answered; returns how many lines were refused.

    --json (or a pipe): one object per query, {"query", "k", "results": [hit, ...]}, or {"line", "error"}
    for a line that is not a query. --paths: the paths, then an empty line (with -0: each path and then an
    empty entry ended by NUL). Repeated texts (and the --not terms) are embedded once (the model's in-process
    cache)."""
    from ..errors import UsageError
    from ..index.search import query_vector

    failed = 0
    as_json = as_json or (not paths and not output.is_terminal())
    for number, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            text, top = parse_query_line(line, k)
        except UsageError as exc:
            failed += 1
            if as_json:
                output.json_line({"line": number, "error": str(exc)})
            print(f"error: line {number}: {exc}", file=sys.stderr)
            continue
        hits = searcher.search(query_vector(m, [text], negative, cache=True), k=top, min_score=min_score)
        if as_json:
            output.json_line({"query": text, "k": top, "results": _with_tags(searcher.store, hits, sets)})
        elif paths:
            _print_paths([h.path for h in hits] + [""], null)
        else:
            _table(hits, text, negative, note, searcher.store.roots())
        sys.stdout.flush()
    return failed


def _print_paths(paths: list[str], null: bool) -> None:
    """`--paths`/`-0` output (see `output.write_path`), with one warning on stderr when a name had to be escaped."""
    escaped = sum(output.write_path(p, null) for p in paths)
    sys.stdout.flush()
    if escaped:
        print(f"warning: {escaped} path(s) hold control characters (such as a newline) and are printed escaped, "
              "so they name no file; use -0 (with xargs -0) for exact paths", file=sys.stderr)


def parse_query_line(line: str, k: int) -> tuple[str, int]:
    """A `--stdin` line → (query text, k): the line itself, or a JSON object {"query": str, "k": int}."""
    from ..errors import UsageError

    if not line.startswith("{"):
        return line, k
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    text, top = obj.get("query"), obj.get("k", k)
    if not isinstance(text, str) or not text.strip():
        raise UsageError('a JSON query line needs a non-empty "query" string')
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UsageError(f'"k" must be a whole number ≥ 1, not {top!r}')
    return text.strip(), top


def _precision_note(index_precisions: list[str], query_precision: str | None) -> str:
    """A caption for the table when the index and the query were embedded at different precisions; the
    scores stay comparable (same weights; int8 within cosine 0.995 of fp32), so nothing else changes."""
    if not index_precisions or query_precision is None or index_precisions == [query_precision]:
        return ""
    return (f"index embedded at {' + '.join(index_precisions)}, query at {query_precision}: "
            "scores may differ from a single-precision search in the third decimal")


def _table(hits, title: str, negative, note: str = "", roots: list[str] | None = None) -> None:
    """The results on a terminal: each file's name first and whole (an 80-column table must not cut its
    extension), and under it, dimmed, its folder relative to the indexed folder it lies in."""
    from rich.table import Table

    con = output.stdout_console()
    if not hits:
        con.print("no results")
        return
    roots = roots or []
    if negative:
        title += "  (not: " + ", ".join(negative) + ")"
    captions = [f"folders relative to {output.literal(roots[0])}"] if len(roots) == 1 else []
    table = Table(title=output.literal(title), caption="\n".join(captions + ([note] if note else [])) or None)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("file (folder)", overflow="fold")
    table.add_column("at", justify="right", no_wrap=True)
    table.add_column("length", justify="right", no_wrap=True)
    for h in hits:
        folder = folder_in_index(h.path, roots)
        name = output.literal(os.path.basename(h.path)) + ("" if folder == "." else
                                                           f"\n[dim]{output.literal(folder)}[/]")
        at = output.clock_range(h.start, h.end) if h.start is not None else ""
        table.add_row(str(h.rank), f"{h.score:.3f}", name, at, output.clock(h.duration) if h.duration else "")
    con.print(table)


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


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
