"""`clap search`: text or example audio → the best-matching files of an index.

A text search runs the model's saved query graph (`clapcli.models.onnx_text`, written by `clap index`) without
importing torch; where none is saved (or --engine torch, a GPU, another precision) it loads the text half of the
model (`load_model(..., text_only=True)`). An example file that is in the index and unchanged brings its stored
vector (no model, no audio work); only an example that is not loads the whole model (`QueryModels`). `--stdin`
loads each model at most once and answers one query per input line.
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
        "--not). An existing audio file searches by example (as --audio; after a lone -, as --not-audio).",
    ),
    audio: Optional[List[Path]] = typer.Option(None, "--audio", "-a", help="Query by example: an audio file "
                                               "(repeatable). A file in the index, unchanged since, brings its "
                                               "stored vector (no model load); the file itself is left out of the "
                                               "results (see --include-self)."),
    negative: Optional[List[str]] = typer.Option(None, "--not", "-n", help="Push results away from this text "
                                                 "(repeatable)."),
    not_audio: Optional[List[Path]] = typer.Option(None, "--not-audio", help="Push results away from the sound of "
                                                   "this audio file (repeatable)."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="Number of files to return."),
    per_file: int = typer.Option(1, "--per-file", min=1, help="Up to N matching windows of a long file, "
                                 "adjacent ones merged into one time range (--json: \"ranges\")."),
    include_self: bool = typer.Option(False, "--include-self", help="Keep an --audio example that is in the index "
                                      "among the results (by default it is left out: it would be hit #1)."),
    min_score: Optional[float] = typer.Option(None, "--min-score", help="Drop results below this cosine score."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line: rank, score, path, start, end, "
                                 "duration, ranges, missing, and query (how the query was read: text, not, audio, "
                                 "not_audio)."),
    paths: bool = typer.Option(False, "--paths", help="Print matching paths only (for piping), leaving out files "
                               "gone from disk since they were indexed; a name holding a control character (a "
                               "newline) is printed escaped, with a warning: use -0."),
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
                               "standard input: plain text, or JSON with a 'query' and/or 'audio' (a file or a "
                               "list), optional 'not', 'not_audio' and 'k'."),
    tag: Optional[List[str]] = typer.Option(None, "--tag", help="Only files tagged with this label (repeatable: all "
                                            "of them), as `clap tag --index` stored them."),
    not_tag: Optional[List[str]] = typer.Option(None, "--not-tag", help="Leave out files tagged with this label "
                                                "(repeatable)."),
    tag_set: Optional[str] = typer.Option(None, "--tag-set", help="The tag set (id or name, see `clap index list`) "
                                          "--tag, --not-tag and --json's tags read (default: every set of the index)."),
) -> None:
    """Search an index with text (and/or --audio FILE); results are files ranked by their best segment."""
    from ..errors import UsageError
    from ..index.listing import open_searchable
    from ..index.lookup import stored_path
    from ..index.paths import resolve_index
    from ..index.query import read_query
    from ..index.search import Searcher, query_vector
    from ..index.tag_store import hits_json

    read = read_query(query or [], negative or [], [str(a) for a in audio or []], [str(a) for a in not_audio or []])
    for path in read.audio[len(audio or []):]:
        output.stderr_console().print(f"searching by example: {output.literal(path)} is an audio file (as with "
                                      "--audio)", highlight=False)
    for path in read.not_audio[len(not_audio or []):]:
        output.stderr_console().print(f"pushing away: {output.literal(path)} is an audio file (as with "
                                      "--not-audio)", highlight=False)
    query, negative = read.text, read.negative
    for flag, given in (("--audio", read.audio), ("--not-audio", read.not_audio)):
        for a in map(Path, given):  # before the model loads: a typo fails at once
            if not a.exists():
                raise UsageError(f"{flag} {output.display_path(a)}: no such file")
            if not a.is_file():
                raise UsageError(f"{flag} {output.display_path(a)}: not a file")
    paths = paths or null
    if as_json and paths:
        raise UsageError(f"choose one of --json and {'-0' if null else '--paths'}")
    if stdin and (query or read.audio):
        raise UsageError("--stdin reads the queries from standard input; give no QUERY or --audio with it")
    if not query and not read.audio and not stdin:
        raise UsageError("nothing to search for: give a text query and/or --audio FILE")
    index_dir = resolve_index(index)
    with open_searchable(index, index_dir) as store:
        models = QueryModels(store, index, index_dir, model, device, precision, tokenizer, engine)
        sets, keep = _tag_choice(store, tag or [], not_tag or [], tag_set)
        searcher = Searcher(store, keep=keep)
        if stdin:
            models.text_model()  # loaded (and checked against the index) before the first line is read
            failed = _answer_stdin(models, searcher, read, k, min_score, per_file, include_self, as_json, paths,
                                   null, sets)
            if failed:
                raise typer.Exit(1)
            return
        m, stored = models.prepare(read)
        if m is None and model is not None:
            models.text_model()  # --model must match the index even when the stored vectors answer
        q = query_vector(m, query, negative, read.audio, negative_audio=read.not_audio, stored=stored)
        exclude = () if include_self else {stored_path(a) for a in read.audio}
        hits = searcher.search(q, k=k, min_score=min_score, per_file=per_file, exclude=exclude, skip_missing=paths)
        note = _precision_note(store.precisions, getattr(m, "precision", None))  # None: stored vectors alone
        roots = store.roots()
        results = hits_json(store, hits, sets)
    if paths:
        _print_paths([h.path for h in hits], null)
        _note_missing(searcher.missing_left_out)
    elif as_json or not output.is_terminal():
        for result in results:
            output.json_line({**result, "query": read.to_dict()})
    else:
        _table(hits, " + ".join(query + read.audio), negative + read.not_audio, note, roots, per_file)


class QueryModels:
    """The models a search needs, each loaded at most once and checked against the index: for text, the saved
    torch-free query graph or the text half of the model; for example audio that is not in the index (or has
    changed since), the whole model. Examples that are in the index bring their stored vectors, so a query made
    of them alone loads nothing."""

    def __init__(self, store, index, index_dir, model, device, precision, tokenizer, engine):
        self.store, self.index, self.index_dir, self.model = store, index, index_dir, model
        self.settings = (device, precision, tokenizer, engine)  # as given on the command line
        self._text = self._whole = None

    @property
    def precision(self) -> str | None:
        """The precision of the model loaded for the queries (None while none is: stored vectors alone)."""
        loaded = self._whole or self._text
        return getattr(loaded, "precision", None) if loaded is not None else None

    def text_model(self):
        if self._whole is not None:
            return self._whole
        if self._text is None:
            self._text = self._load(whole=False)
        return self._text

    def whole_model(self):
        if self._whole is None:
            self._whole = self._load(whole=True)
        return self._whole

    def prepare(self, read):
        """(the model that embeds what `read` needs embedded, or None; the stored vectors of its indexed
        examples) for `query_vector`."""
        from ..index.search import stored_vectors

        examples = read.audio + read.not_audio
        stored = stored_vectors(self.store, examples)
        if any(a not in stored for a in examples):
            return self.whole_model(), stored
        return (self.text_model() if read.text or read.negative else None), stored

    def _load(self, whole: bool):
        from ..index.paths import check_remembered_model
        from ..index.query import text_query_model
        from ..index.search import model_mismatch_advice, moved_model_advice

        identity = self.store.model_identity or {}
        if self.model is None:
            check_remembered_model(identity.get("model"), self.index_dir, moved_model_advice(self.index))
        ref = self.model or identity.get("model")
        device, precision, tokenizer, engine = self.settings
        if whole:
            m = options.load(ref, device, precision, tokenizer, text_only=False, engine=engine)
        else:
            m = text_query_model(ref, identity, device, precision, tokenizer, engine, load=options.load)
        wanted = m.identity_dict
        self.store.check_model_identity(wanted, advice=model_mismatch_advice(self.index, wanted.get("model"),
                                                                             self.model is not None))
        return m


def _tag_choice(store, tags: list[str], not_tags: list[str], choice: str | None):
    """(the tag sets in use, the `keep` test of --tag/--not-tag or None) for this index."""
    from ..index.tag_store import choose_tag_sets, tag_filter

    sets = choose_tag_sets(store, choice)
    return sets, tag_filter(store, tags, not_tags, sets)


def _answer_stdin(models, searcher, given, k, min_score, per_file, include_self, as_json, paths, null,
                  sets=()) -> int:
    """One result set per query line, flushed as it is answered; returns how many lines were refused.

    --json (or a pipe): one object per query, {"query", "audio", "not", "not_audio", "k", "results": [hit, ...]},
    or {"line", "error"} for a line that is not a query (or whose example audio cannot be used). --paths: the
    paths, then an empty line (with -0: each path and then an empty entry ended by NUL). `given` holds the
    --not and --not-audio of the command line, which push every line's results away. Repeated texts (and the
    --not terms) are embedded once (the model's in-process cache); indexed example files bring their stored
    vectors, and the whole model loads only for the first example that is not in the index."""
    from ..errors import ClapError, UsageError
    from ..index.lookup import stored_path
    from ..index.search import query_vector
    from ..index.tag_store import hits_json

    failed = 0
    as_json = as_json or (not paths and not output.is_terminal())

    def refuse(number: int, exc: Exception) -> None:
        nonlocal failed
        failed += 1
        if as_json:
            output.json_line({"line": number, "error": str(exc)})
        print(f"error: line {number}: {exc}", file=sys.stderr)

    for number, line in enumerate(sys.stdin, 1):
        line = line.strip()
        if not line:
            continue
        try:
            read, top = parse_query_line(line, k)
        except UsageError as exc:
            refuse(number, exc)
            continue
        read.negative += given.negative
        read.not_audio += given.not_audio
        m, stored = models.prepare(read)  # a model that cannot load (or is not the index's) fails every line: stop
        try:
            q = query_vector(m, read.text, read.negative, read.audio, cache=True, negative_audio=read.not_audio,
                             stored=stored)
        except ClapError as exc:  # an example that does not decode, terms that cancel out
            refuse(number, exc)
            continue
        exclude = () if include_self else {stored_path(a) for a in read.audio}
        hits = searcher.search(q, k=top, min_score=min_score, per_file=per_file, exclude=exclude, skip_missing=paths)
        if as_json:
            output.json_line({"query": " + ".join(read.text) or None, "audio": read.audio, "not": read.negative,
                              "not_audio": read.not_audio, "k": top, "results": hits_json(searcher.store, hits, sets)})
        elif paths:
            _print_paths([h.path for h in hits] + [""], null)
            _note_missing(searcher.missing_left_out)
        else:
            _table(hits, " + ".join(read.text + read.audio), read.negative + read.not_audio,
                   _precision_note(searcher.store.precisions, models.precision), searcher.store.roots(), per_file)
        sys.stdout.flush()
    return failed


def _print_paths(paths: list[str], null: bool) -> None:
    """`--paths`/`-0` output (see `output.write_path`), with one warning on stderr when a name had to be escaped."""
    escaped = sum(output.write_path(p, null) for p in paths)
    sys.stdout.flush()
    if escaped:
        print(f"warning: {escaped} path(s) hold control characters (such as a newline) and are printed escaped, "
              "so they name no file; use -0 (with xargs -0) for exact paths", file=sys.stderr)


def _note_missing(left_out: int) -> None:
    """After `--paths`: say on stderr that files gone from disk were passed over (the index lags behind)."""
    if left_out:
        print(f"note: left out {output.plural(left_out, 'file')} gone from disk since indexed (`clap index` on its "
              "folder forgets them)", file=sys.stderr)


def parse_query_line(line: str, k: int):
    """A `--stdin` line → (Query, k): the line itself as text, or a JSON object with a "query" string and/or
    "audio" (an example file, or a list of them), optional "not" (texts) and "not_audio" (files) to push away,
    each a string or a list of strings, and "k" (a whole number ≥ 1). The example files must exist."""
    from ..errors import UsageError
    from ..index.query import Query

    if not line.startswith("{"):
        return Query(text=[line]), k
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UsageError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    text, top = obj.get("query"), obj.get("k", k)
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise UsageError('"query" must be a non-empty string')
    read = Query(text=[text.strip()] if text else [], negative=_strings(obj, "not"), audio=_strings(obj, "audio"),
                 not_audio=_strings(obj, "not_audio"))
    if not read.text and not read.audio:
        raise UsageError('a JSON query line needs a non-empty "query" string or an "audio" file')
    for key, files in (("audio", read.audio), ("not_audio", read.not_audio)):
        for path in files:
            if not os.path.isfile(path):
                raise UsageError(f'"{key}" {output.display_path(path)}: ' +
                                 ("not a file" if os.path.exists(path) else "no such file"))
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise UsageError(f'"k" must be a whole number ≥ 1, not {top!r}')
    return read, top


def _strings(obj: dict, key: str) -> list[str]:
    """A JSON query line's `key`: absent, a non-empty string, or a list of them → a list."""
    from ..errors import UsageError

    value = obj.get(key, [])
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) and v.strip() for v in items):
        raise UsageError(f'"{key}" must be a non-empty string or a list of them')
    return [v.strip() for v in items]


def _precision_note(index_precisions: list[str], query_precision: str | None) -> str:
    """A caption for the table when the index and the query were embedded at different precisions; the
    scores stay comparable (same weights; int8 within cosine 0.995 of fp32), so nothing else changes."""
    if not index_precisions or query_precision is None or index_precisions == [query_precision]:
        return ""
    return (f"index embedded at {' + '.join(index_precisions)}, query at {query_precision}: "
            "scores may differ from a single-precision search in the third decimal")


def _table(hits, title: str, negative, note: str = "", roots: list[str] | None = None, per_file: int = 1) -> None:
    """The results on a terminal: each file's name first and whole (an 80-column table must not cut its
    extension), marked when the file is gone from disk, and under it, dimmed, its folder relative to the indexed
    folder it lies in. With `per_file` > 1, "at" lists a long file's matching ranges, best first."""
    from rich.table import Table

    from ..index.paths import folder_in_index

    con = output.stdout_console()
    if not hits:
        con.print("no results")
        return
    roots = roots or []
    if negative:
        title += "  (not: " + ", ".join(negative) + ")"
    captions = [f"folders relative to {output.literal(roots[0])}"] if len(roots) == 1 else []
    if any(h.missing for h in hits):
        captions.append("missing: gone from disk since indexed (`clap index` on its folder forgets it)")
    table = Table(title=output.literal(title), caption="\n".join(captions + ([note] if note else [])) or None)
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("file (folder)", overflow="fold")
    table.add_column("at", justify="right", no_wrap=True)
    table.add_column("length", justify="right", no_wrap=True)
    for h in hits:
        folder = folder_in_index(h.path, roots)
        name = (output.literal(os.path.basename(h.path)) + (" [red](missing)[/]" if h.missing else "")
                + ("" if folder == "." else f"\n[dim]{output.literal(folder)}[/]"))
        if per_file > 1 and h.ranges:
            at = "\n".join(output.clock_range(r.start, r.end) for r in h.ranges)
        else:
            at = output.clock_range(h.start, h.end) if h.start is not None else ""
        table.add_row(str(h.rank), f"{h.score:.3f}", name, at, output.clock(h.duration) if h.duration else "")
    con.print(table)


def register(app: typer.Typer) -> None:
    app.command("search")(search_command)
