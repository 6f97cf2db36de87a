"""`clap serve`: a read-only web page and JSON API over an index (the app is `clapcli.serve.app`)."""

from __future__ import annotations

from typing import Optional

import typer

from . import output
from .index import INDEX

EXTRA = "clap serve needs the serve extra: pip install 'clapcli[serve]'"


def serve_command(
    index: Optional[str] = INDEX,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs a token "
                             "(one is made up and printed in the URL when --token is not given)."),
    port: int = typer.Option(8765, "--port", "-p", min=0, max=65535, help="Port to listen on (0: any free one)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the web browser."),
    labels: str = typer.Option("audioset", "--labels", "-l", help="Label set for the results' tags and the map's "
                               "colours: a built-in set, @FILE or a comma list (as `clap tag --labels`)."),
    token: Optional[str] = typer.Option(None, "--token", envvar="CLAP_SERVE_TOKEN", help="Require this token on "
                                        "every request (?token=… or the X-Clap-Token header)."),
) -> None:
    """Serve an index as a web page and a JSON API (read-only): search, listen, find similar sounds."""
    from ..errors import ClapError, UsageError
    from ..index.paths import resolve_index

    from importlib.util import find_spec

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ClapError(EXTRA) from None
    if find_spec("python_multipart") is None and find_spec("multipart") is None:  # python-multipart: uploads
        raise ClapError(EXTRA)
    from ..serve.app import ServeConfig, create_app
    from ..serve.guard import is_loopback, new_token

    if token is not None and not token.strip():
        raise UsageError("empty --token; leave it out to serve loopback without one")
    if token is None and not is_loopback(host):
        token = new_token()
    app = create_app(ServeConfig(resolve_index(index), host=host, token=token, labels=labels))
    try:
        sock = _listen(host, port)
    except OSError as exc:
        app.served.close()
        reason = "the port is in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
        raise ClapError(f"cannot listen on {host}:{port}: {reason}; pass another --port (0: any free one)") from None
    app.served.index_thread.submit(app.served.reader.text_model)  # warm while the browser opens
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{sock.getsockname()[1]}/" + (f"?token={token}" if token else "")
    print(f"serving {app.served.reader.index_dir} at {url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops cleanly on Ctrl-C, then raises it again: the stop asked for
        pass
    finally:
        sock.close()
    output.stderr_console().print("stopped", highlight=False)


def _listen(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
