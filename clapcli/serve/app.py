"""The `clap serve` app: a Starlette app over one index, read-only; `create_app(ServeConfig(...))`.

Every route answers JSON with the CLI's `--json` keys (see docs/serve.md for the API), except `/`
and `/static/…` (the page, in `static/`) and `/api/audio/N` (the file's bytes). Errors are `{"error": "one-line
message"}` with 400, 403 (`guard.py`), 404, 413 or 503.

Threads: the index is read on one thread of its own (SQLite connections belong to their thread; reads are
milliseconds), through `_index`; decoding (peaks, WAV for formats a browser cannot play) and embedding an upload
run on Starlette's worker threads, so a long file never holds up a search.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import ClapError, UsageError, first_line
from . import playback
from .guard import Guard
from .mapping import MapCache
from .peaks import DEFAULT_BUCKETS, MAX_BUCKETS, file_peaks
from .reader import DEFAULT_LABELS, IndexReader, NotFound

MAX_UPLOAD_BYTES = 64 << 20  # an example sound, not a library: 64 MiB
MAX_K = 1000


@dataclass
class ServeConfig:
    index_dir: Path  # the index to serve (read-only)
    host: str = "127.0.0.1"  # the address bound: what the Host check accepts besides loopback names
    token: str | None = None  # required on every request when set (`clap serve` sets one off loopback)
    labels: str = DEFAULT_LABELS  # the label set the hits' tags and the map's colours come from


class Served:
    """The state behind the routes: the reader, its thread, the map cache."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.reader = IndexReader(config.index_dir, config.labels)
        self.index_thread = ThreadPoolExecutor(1, thread_name_prefix="clap-serve-index")
        self.maps = MapCache()

    async def index(self, fn, *args):
        """Run `fn(*args)` on the index thread."""
        return await asyncio.wrap_future(self.index_thread.submit(fn, *args))

    def close(self) -> None:
        self.index_thread.submit(self.reader.close).result()
        self.index_thread.shutdown()


def create_app(config: ServeConfig) -> Guard:
    """The app, an ASGI callable: the Starlette app inside its `Guard`, whose `served` holds the state (the
    reader, its thread). Raises ClapError when the index cannot be served (missing, empty, bad --labels)."""
    served = Served(config)

    async def page(request: Request) -> Response:
        index_html = resources.files("clapcli.serve") / "static" / "index.html"
        if not index_html.is_file():
            return HTMLResponse("<!doctype html><title>clap serve</title><p>The page is not installed; the API "
                                "answers under <code>/api/</code>.</p>")
        return HTMLResponse(index_html.read_text(encoding="utf-8"))

    async def status(request: Request) -> Response:
        return JSONResponse(await served.index(served.reader.status))

    async def search(request: Request) -> Response:
        text = request.query_params.get("q", "")
        if not text.strip():
            raise UsageError("empty query: give words to search for (?q=rain+on+a+roof)")
        return JSONResponse(await served.index(served.reader.search_text, text, _k(request)))

    async def similar(request: Request) -> Response:
        return JSONResponse(await served.index(served.reader.similar, _id(request), _k(request)))

    async def similar_audio(request: Request) -> Response:
        data, filename = await _upload(request)
        identity = await served.index(served.reader.identity)
        query = await run_in_threadpool(_embed_upload, served.reader, identity, data, filename)
        read = {"text": [], "not": [], "audio": [filename]}
        return JSONResponse(await served.index(served.reader.search_vector, query, _k(request), read))

    async def tags(request: Request) -> Response:
        return JSONResponse(await served.index(served.reader.tags, _id(request)))

    async def audio(request: Request) -> Response:
        record, roots = await served.index(served.reader.file, int(request.path_params["file_id"]))
        path = await run_in_threadpool(playback.checked_path, record, roots)
        if playback.browser_plays(path):
            return FileResponse(path, media_type=playback.media_type(path))
        return await run_in_threadpool(playback.wav_response, path, request.headers.get("range"))

    async def peaks(request: Request) -> Response:
        record, roots = await served.index(served.reader.file, int(request.path_params["file_id"]))
        n = _int(request, "n", DEFAULT_BUCKETS, 1, MAX_BUCKETS)
        path = await run_in_threadpool(playback.checked_path, record, roots)
        values = await run_in_threadpool(file_peaks, path, record, n)
        return JSONResponse({"id": record.id, "duration": record.duration, "peaks": values})

    async def map_(request: Request) -> Response:
        color = request.query_params.get("color", "folder")
        if color not in ("folder", "tag"):
            raise UsageError(f"color must be folder or tag, not {color!r}")
        body = await served.maps.answer(served, color)
        return Response(body, media_type="application/json")

    async def clap_error(request: Request, exc: Exception) -> Response:
        status = (404 if isinstance(exc, NotFound) else 403 if isinstance(exc, playback.Forbidden)
                  else 413 if isinstance(exc, TooLarge) else 400 if isinstance(exc, UsageError) else 503)
        return JSONResponse({"error": first_line(exc)}, status_code=status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        message = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code)

    routes = [
        Route("/", page),
        Route("/api/status", status),
        Route("/api/search", search),
        Route("/api/similar", similar),
        Route("/api/similar-audio", similar_audio, methods=["POST"]),
        Route("/api/tags", tags),
        Route("/api/audio/{file_id:int}", audio),
        Route("/api/peaks/{file_id:int}", peaks),
        Route("/api/map", map_),
    ]
    static = Path(str(resources.files("clapcli.serve") / "static"))
    if static.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=static), name="static"))
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        served.close()

    app = Starlette(routes=routes, exception_handlers={ClapError: clap_error, HTTPException: http_error},
                    lifespan=lifespan)
    app.state.served = served
    guarded = Guard(app, config.host, config.token)
    guarded.served = served
    return guarded


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, not {value!r}") from None
    if not low <= number <= high:
        raise UsageError(f"{name} must be between {low} and {high}, not {number}")
    return number


def _k(request: Request) -> int:
    return _int(request, "k", 50, 1, MAX_K)


def _id(request: Request) -> int:
    if "id" not in request.query_params:
        raise UsageError("give the file's index id: ?id=N")
    try:
        return int(request.query_params["id"])
    except ValueError:
        raise NotFound(f"no file with id {request.query_params['id']!r} in this index") from None


class TooLarge(ClapError):
    """An upload past MAX_UPLOAD_BYTES: HTTP 413."""


async def _upload(request: Request) -> tuple[bytes, str]:
    """The `file` field of a multipart upload, read into memory and refused past MAX_UPLOAD_BYTES (whatever
    Content-Length claims, the bytes are counted)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD_BYTES + (1 << 16):
        raise TooLarge(f"upload too large: at most {MAX_UPLOAD_BYTES >> 20} MiB")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD_BYTES + (1 << 16):  # the form's own headers ride along
            raise TooLarge(f"upload too large: at most {MAX_UPLOAD_BYTES >> 20} MiB")

    async def replay():
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise UsageError("send the example sound as the multipart form field `file`")
    data = await upload.read()
    if len(data) > MAX_UPLOAD_BYTES:
        raise TooLarge(f"upload too large: at most {MAX_UPLOAD_BYTES >> 20} MiB")
    if not data:
        raise UsageError("the uploaded file is empty")
    return data, os.path.basename(upload.filename or "upload")


def _embed_upload(reader: IndexReader, identity: dict, data: bytes, filename: str):
    """The query vector of an uploaded example, decoded from a private temporary folder (never the library)."""
    from ..index.search import query_vector

    suffix = "".join(c for c in os.path.splitext(filename)[1][:8] if c.isalnum() or c == ".")
    model = reader.audio_model(identity)
    with tempfile.TemporaryDirectory(prefix="clap-serve-") as tmp:
        path = os.path.join(tmp, "upload" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        try:
            return query_vector(model, audio=[path])
        except ClapError as exc:
            raise UsageError(f"cannot use {filename} as a query: {first_line(exc).split(': ')[-1]}") from None
