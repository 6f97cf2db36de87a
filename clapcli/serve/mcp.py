"""`clap mcp`: a Model Context Protocol server over stdio (the official `mcp` SDK), so that an assistant can use a
sound library: `search`, `similar`, `tag`, `dedupe` and `indexes`, read-only.

Results carry the keys of the matching command's `--json` lines (`clap search`, `clap tag`, `clap index list`), one
text block per object, and the list as structured content. A failure comes back as a tool error (`isError`) whose
text is the one-line message the CLI prints after `error: `.

`Library` holds the state the tools share: one index, opened read-only on first use (and again when `clap index
--rebuild` has swapped its database), and the model, loaded once, on the first call that needs it: a text search
runs the index's saved query graph, or the text half of the model; tagging and audio queries load the whole model.
SQLite connections and models are not for sharing between threads, so every call runs on one worker thread, in
turn.

(No `from __future__ import annotations`: the SDK reads the tools' annotations, which name the SDK's types imported
in `build_server`, so they are evaluated where the tools are defined.)
"""

import asyncio
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ..errors import ClapError, UsageError, first_line
from ..index.listing import describe_index, named_indexes, open_searchable
from ..index.lookup import stored_file, stored_path
from ..index.paths import check_remembered_model, resolve_index
from ..index.query import Query, read_query, text_query_model
from ..index.scan import audio_files
from ..index.schema import DB_FILENAME
from ..index.search import Searcher, model_mismatch_advice, query_vector
from ..index.tag_store import hits_json
from ..version import __version__

SDK_HINT = "pip install 'clapcli[mcp]'"

log = logging.getLogger(__name__)


class Library:
    """One index and the model, as the tools read them (see the module docstring). Not thread-safe: `serve` calls
    it from one thread."""

    def __init__(self, index: str | None = None, device: str = "auto", precision: str = "auto",
                 engine: str | None = None):
        self.index = index  # as given (--index): a name, a path, or None for the default index
        self.index_dir = resolve_index(index)
        self.device, self.precision = device, precision
        self.engine = engine if engine is not None else os.environ.get("CLAP_ENGINE")
        self._searcher: Searcher | None = None
        self._opened: tuple[int, int] | None = None  # (st_dev, st_ino) of the database the searcher reads
        self._text_model = None  # answers text queries: the saved query graph or the model's text half
        self._model = None  # the whole model: tagging, audio queries
        self._classifiers: dict[str, Any] = {}  # classifier directory → its loaded scorer

    # -- tools ------------------------------------------------------------------------------------------------

    def search(self, query: str, negative: list[str] | None = None, k: int = 10, min_score: float | None = None,
               tag: list[str] | None = None, not_tag: list[str] | None = None,
               tag_set: str | None = None) -> list[dict]:
        """`clap search QUERY --json`: the words as the search box reads them (` + ` adds a query, ` - ` pushes one
        away, an existing audio file searches by example); `tag`/`not_tag`/`tag_set` as `--tag`/`--not-tag`/
        `--tag-set` (tags stored by `clap tag --index`), and each hit's stored `tags` where the index holds some."""
        from ..index.tag_store import choose_tag_sets, tag_filter

        read = read_query(query.split(), list(negative or []), [])
        if not read.text and not read.audio:
            raise UsageError("nothing to search for: give a text query")
        searcher = self._open()
        sets = choose_tag_sets(searcher.store, tag_set)
        keep = tag_filter(searcher.store, tag or [], not_tag or [], sets)  # before the model loads
        model = self._query_model(audio=bool(read.audio))
        q = query_vector(model, read.text, read.negative, read.audio, cache=True)
        searcher.keep = keep  # this call's filter: the searcher (and its graph) is shared by every call
        hits = searcher.search(q, k=k, min_score=min_score)
        return [{**h, "query": read.to_dict()} for h in hits_json(searcher.store, hits, sets)]

    def similar(self, path: str, k: int = 10, min_score: float | None = None) -> list[dict]:
        """The files most like an indexed file, itself left out (`clap search --audio PATH --json`'s keys). An
        unchanged file's stored vector is the query (no model); a file changed since it was indexed is embedded
        again."""
        searcher = self._open()
        found = stored_file(searcher.store, path)
        if found is not None:
            own, q = found.record.path, found.vector
        else:
            own = stored_path(path)
            record = searcher.store.file_record(own)
            if record is None:
                raise UsageError(f"{path} is not in the index at {self.index_dir}; `similar` takes a file the index "
                                 "holds (`search` finds them)")
            if record.status not in ("ok", "partial"):
                raise ClapError(f"{path} could not be indexed: {record.error}")
            if not os.path.isfile(own):
                raise ClapError(f"{path}: no such file (it was indexed, and has gone since)")
            q = query_vector(self._whole_model(), audio=[own])
        searcher.keep = None
        hits = searcher.search(q, k=k, min_score=min_score, exclude=(own,))
        query = Query(audio=[own]).to_dict()
        return [{**h.to_dict(), "query": query} for h in hits]

    def tag(self, paths: list[str], labels: str | None = None, classifier: str | None = None, top: int | None = None,
            multi_label: bool = False, threshold: float | None = None, templates: list[str] | None = None,
            timeline: bool = False, progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """`clap tag PATH… --json`: zero-shot tags from a label set, or a `clap finetune` classifier's; one object per
        file, a file that cannot be read has an `error`. `progress(files done, files)` after each file."""
        from ..tagging import resolve_labels, tag_files
        from ..tagging.prompts import check_templates

        if not paths:
            raise UsageError("give at least one audio file to tag")
        if (labels is None) == (classifier is None):
            raise UsageError("choose either labels (a built-in label set such as esc50, a comma list 'dog,rain,siren' "
                             "or @FILE) or a classifier directory from `clap finetune`")
        if classifier is not None and templates:
            raise UsageError("a classifier brings its own labels: drop templates")
        if threshold is None and multi_label:
            if classifier is None:
                raise UsageError("multi_label needs a threshold, a cosine such as 0.2: CLAP has no calibrated "
                                 "per-label probability, so the cut-off depends on the model")
            threshold = 0.5  # a multi-label head's sigmoid is a per-label probability
        if threshold is not None:
            low, what = (-1.0, "a cosine") if multi_label and classifier is None else (0.0, "a probability")
            if not low <= threshold <= 1.0:
                raise UsageError(f"threshold {threshold:g} is not {what} in [{low:g}, 1]")
        top_k = top if top is not None else (None if multi_label else 5)
        labelset = resolve_labels(labels) if labels is not None else None  # before any model loads
        checked = check_templates(templates) if classifier is None else None
        files = audio_files(paths)
        if classifier is not None:
            scorer = self._classifier(classifier)
            model = scorer.model
        else:
            scorer, model = None, self._whole_model()
        results = tag_files(model, files, labelset, checked, top_k=top_k, multi_label=multi_label,
                            threshold=threshold, timeline=timeline, scorer=scorer)
        tagged = []
        for result in results:
            tagged.append(result.to_dict())
            if progress is not None:
                progress(len(tagged), len(files))
        return tagged

    def dedupe(self, threshold: float | None = None, k: int = 10,
               progress: Callable[[int, int], None] | None = None) -> list[dict]:
        """`clap dedupe --json`: groups of indexed files that hold the same recording, each with a suggested keeper;
        `progress(pairs checked, pairs to check)` as audio is compared. Nothing is deleted."""
        from ..library.dedupe import DEFAULT_THRESHOLD, find_duplicates

        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise UsageError(f"threshold {threshold:g} is not a cosine in [-1, 1]")
        found = find_duplicates(self._open().store, DEFAULT_THRESHOLD if threshold is None else threshold, k, progress)
        return [group.to_dict() for group in found]

    def indexes(self) -> list[dict]:
        """`clap index list --json`: the indexes under $CLAP_HOME/indexes."""
        return [describe_index(d) for d in named_indexes()]

    def close(self) -> None:
        if self._searcher is not None:
            self._searcher.store.close()
            self._searcher = None

    # -- state --------------------------------------------------------------------------------------------------

    def _open(self) -> Searcher:
        """The searcher on the index, opened on first use, and opened again when its database file has been
        replaced (a rebuild swaps in a new one): a connection to the old file would answer from it forever."""
        try:
            st = os.stat(self.index_dir / DB_FILENAME)
            current = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if self._searcher is not None and current == self._opened:
            return self._searcher
        self.close()
        self._searcher = Searcher(open_searchable(self.index, self.index_dir))
        self._opened = current
        return self._searcher

    def _index_model(self) -> tuple[str | None, dict]:
        """The load reference and identity of the index's model; (None, {}) where there is no index yet, so that
        tagging works without one ($CLAP_MODEL, else the default model). Read from a short read-only open: tagging
        needs no searchable (non-empty) index."""
        from ..index.store import IndexStore

        if not IndexStore.exists(self.index_dir):
            return os.environ.get("CLAP_MODEL"), {}
        with IndexStore.open(self.index_dir, readonly=True) as store:
            identity = store.model_identity or {}
        ref = identity.get("model")
        check_remembered_model(ref, self.index_dir, _moved_model_advice(self.index))
        return ref, identity

    def _query_model(self, audio: bool):
        if audio or self._model is not None:
            return self._whole_model()
        if self._text_model is None:
            ref, identity = self._index_model()
            model = text_query_model(ref, identity, self.device, self.precision, None, self.engine)
            self._check(model)
            self._text_model = model
        return self._text_model

    def _whole_model(self):
        if self._model is None:
            ref, _ = self._index_model()
            model = self._load(ref, text_only=False)
            self._check(model)
            self._model, self._text_model = model, None  # the whole model answers text queries from now on
        return self._model

    def _classifier(self, directory: str):
        from ..engine.load import load_classifier

        key = os.path.abspath(os.path.expanduser(directory))
        if key not in self._classifiers:
            self._classifiers[key] = load_classifier(directory, device=self.device, precision=self.precision,
                                                     engine=self.engine)
        return self._classifiers[key]

    def _load(self, ref: str | None, text_only: bool):
        from ..engine.load import load_model

        return load_model(ref, device=self.device, precision=self.precision, text_only=text_only, engine=self.engine)

    def _check(self, model) -> None:
        """Refuse a model whose vectors are not the index's (its weights changed at the remembered place)."""
        from ..index.store import IndexStore

        if IndexStore.exists(self.index_dir):
            wanted = model.identity_dict
            with IndexStore.open(self.index_dir, readonly=True) as store:
                store.check_model_identity(wanted, advice=model_mismatch_advice(self.index, wanted.get("model"),
                                                                                given=False))


def _moved_model_advice(index: str | None) -> str:
    where = f" --index {index}" if index else ""
    return f"record its new place in the index with `clap index DIR…{where} --model NEW_PATH`"


# -- the MCP server -------------------------------------------------------------------------------------------------

INSTRUCTIONS = (
    "Search, compare and tag the sounds of a clap index (a sound library embedded with a CLAP model). `search` takes "
    "words as a search box does ('metal impact', 'rain - thunder' pushes thunder away, 'glass + metal' adds two "
    "queries); `similar` finds the files most like one the index holds; `tag` scores audio files against a label "
    "set; `dedupe` finds files that hold the same recording; `indexes` lists the indexes. Paths in results are "
    "absolute. Nothing here writes a file."
)


def require_sdk() -> None:
    """Raise ClapError naming the extra to install when the MCP SDK is missing."""
    import importlib

    try:
        importlib.import_module("mcp.server.mcpserver")
    except ImportError as exc:
        raise ClapError(f"clap mcp needs the MCP SDK, which is not installed: {SDK_HINT}") from exc


def build_server(library: Library, worker: ThreadPoolExecutor):
    """The MCP server (`mcp.server.mcpserver.MCPServer`) whose tools call `library` on `worker`, a one-thread
    executor."""
    require_sdk()
    from typing import Annotated

    from mcp.server.mcpserver import Context, MCPServer
    from mcp.types import CallToolResult, TextContent, ToolAnnotations
    from pydantic import Field

    server = MCPServer("clap", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True,
                                open_world_hint=False)

    async def call(fn: Callable[..., list[dict]], **kwargs) -> CallToolResult:
        """`fn`'s objects as one compact JSON text each (a `--json` line) and as the structured result; an error
        as the CLI's one-line message (without the SDK's "Error executing tool" prefix)."""
        try:
            rows = await asyncio.wrap_future(worker.submit(fn, **kwargs))
        except ClapError as exc:
            return _error(str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug still answers with one line; the traceback goes to stderr
            log.exception("clap mcp: %s failed", getattr(fn, "__name__", fn))
            return _error(f"{type(exc).__name__}: {first_line(exc)}")
        return CallToolResult(content=[_text(json.dumps(row, ensure_ascii=False)) for row in rows],
                              structured_content={"result": rows})

    async def with_progress(ctx, fn: Callable[..., list[dict]], **kwargs) -> CallToolResult:
        """`call`, with `fn`'s `progress(done, total)` sent to a client that asked for progress, every notification
        before the result."""
        loop, sent = asyncio.get_running_loop(), []

        def progress(done: int, total: int) -> None:  # on the worker thread: the notification is sent by the loop
            sent.append(asyncio.run_coroutine_threadsafe(ctx.report_progress(done, total), loop))

        result = await call(fn, progress=progress if ctx is not None else None, **kwargs)
        await asyncio.gather(*map(asyncio.wrap_future, sent), return_exceptions=True)
        return result

    def _text(text: str) -> TextContent:
        return TextContent(type="text", text=text)

    def _error(message: str) -> CallToolResult:
        return CallToolResult(content=[_text(message)], is_error=True)

    K = Annotated[int, Field(ge=1, le=1000, description="How many files to return.")]
    MIN_SCORE = Annotated[float | None, Field(description="Drop results below this cosine score.")]

    @server.tool(annotations=read_only)
    async def search(
        query: Annotated[str, Field(description="What to search for, as typed in a search box: 'glass shattering'. "
                                    "A lone + adds another query ('metal impact + glass'), a lone - pushes one "
                                    "away ('rain - thunder'); an audio file's path searches by example.")],
        negative: Annotated[list[str] | None, Field(description="Texts whose results to push away (as "
                                                    "`clap search --not`).")] = None,
        k: K = 10,
        min_score: MIN_SCORE = None,
        tag: Annotated[list[str] | None, Field(description="Only files tagged with every one of these labels "
                                               "(tags stored by `clap tag --index`).")] = None,
        not_tag: Annotated[list[str] | None, Field(description="Leave out files tagged with any of these "
                                                   "labels.")] = None,
        tag_set: Annotated[str | None, Field(description="The tag set (id or name, see indexes) that tag, not_tag "
                                             "and the results' tags read (default: every set).")] = None,
    ) -> list[dict[str, Any]]:
        """Search the index: the best-matching files, each with rank, score (cosine), path, start and end (seconds:
        the best 10 s window of a long file), duration, tags (where the index stores tags) and query (how the query
        was read: text, not, audio)."""
        return await call(library.search, query=query, negative=negative, k=k, min_score=min_score, tag=tag,
                          not_tag=not_tag, tag_set=tag_set)

    @server.tool(annotations=read_only)
    async def similar(
        path: Annotated[str, Field(description="An audio file the index holds (a path from search results).")],
        k: K = 10,
        min_score: MIN_SCORE = None,
    ) -> list[dict[str, Any]]:
        """More like this: the indexed files most like an indexed file (itself left out), with search's keys."""
        return await call(library.similar, path=path, k=k, min_score=min_score)

    @server.tool(annotations=read_only)
    async def tag(
        paths: Annotated[list[str], Field(description="Audio files (or folders, walked for audio files).")],
        labels: Annotated[str | None, Field(description="A built-in label set (esc50, urbansound8k, audioset, "
                                            "fsd50k, vggsound), a comma list 'dog,rain,siren', or @FILE with one "
                                            "label per line.")] = None,
        classifier: Annotated[str | None, Field(description="A classifier directory from `clap finetune`, "
                                                "instead of labels.")] = None,
        top: Annotated[int | None, Field(ge=1, description="Labels per file (default 5; with multi_label, all "
                                         "above the threshold).")] = None,
        multi_label: Annotated[bool, Field(description="Every label whose cosine is at least threshold, "
                                           "instead of the top labels by probability.")] = False,
        threshold: Annotated[float | None, Field(description="Keep labels scoring at least this: a probability "
                                                 "(0-1), or a cosine with multi_label (required there).")] = None,
        templates: Annotated[list[str] | None, Field(description="Prompt templates with one {} for the label "
                                                     "(default 'This is a sound of {}.').")] = None,
        timeline: Annotated[bool, Field(description="Also tag each 10 s window of longer files.")] = False,
        ctx: Context = None,
    ) -> list[dict[str, Any]]:
        """Tag audio files: for each, path, duration and labels (label, prob, cosine), best first; timeline with
        timeline; error for a file that cannot be read. Reports progress in files."""
        return await with_progress(ctx, library.tag, paths=paths, labels=labels, classifier=classifier, top=top,
                                   multi_label=multi_label, threshold=threshold, templates=templates,
                                   timeline=timeline)

    @server.tool(annotations=read_only)
    async def dedupe(
        threshold: Annotated[float | None, Field(ge=-1.0, le=1.0, description="Cosine of two files' stored vectors "
                                                 "from which their audio is compared (default 0.9).")] = None,
        k: Annotated[int, Field(ge=1, le=1000, description="Nearest neighbours looked at per file.")] = 10,
        ctx: Context = None,
    ) -> list[dict[str, Any]]:
        """Groups of indexed files holding the same recording (another format, rate, depth, gain or trimmed
        silence): keeper {path, format, sample_rate, bit_depth, channels, duration}, why, duplicates [{..., similarity,
        cosine}], score. Nothing is deleted. Reports progress in audio pairs compared."""
        return await with_progress(ctx, library.dedupe, threshold=threshold, k=k)

    @server.tool(annotations=read_only)
    async def indexes() -> list[dict[str, Any]]:
        """The indexes under $CLAP_HOME/indexes: name, path, files, size_bytes, model, roots (the folders indexed)
        and error (why one cannot be read)."""
        return await call(library.indexes)

    return server


def serve(index: str | None = None) -> None:
    """Run the MCP server over stdio until the client closes it."""
    require_sdk()
    library = Library(index)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clap-mcp")
    try:
        build_server(library, worker).run("stdio")
    finally:
        worker.submit(library.close).result()  # on the thread that opened the store
        worker.shutdown()
