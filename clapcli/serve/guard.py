"""Who may talk to `clap serve`: the checks every request passes before it reaches the app.

- Host: a loopback name (`localhost`, `127.0.0.1`, `[::1]`) or the host the server was bound to. A web page
  elsewhere can point its own domain at 127.0.0.1 (DNS rebinding) and have the browser call the server as
  "same origin"; its requests still carry its domain as Host, and are refused. A server bound to every
  interface (0.0.0.0, ::) cannot know its names, so it accepts any Host; it always has a token.
- Origin: a request sent by a page (fetch, a form) says where the page came from; any origin other than the
  server's own (the request's Host) is refused, so another site open in the same browser cannot use the API.
- Token: when the server has one (always off loopback), every request carries it, as the query parameter
  `token` or the header `X-Clap-Token`; compared in constant time. The page's static files (`/static/…`) are
  the exception: its module imports cannot carry the token.

Refusals are 403 with `{"error": "one-line message"}`, like every error of the API.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from urllib.parse import parse_qs, urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
TOKEN_HEADER = "x-clap-token"
# The page's own files (package data, nothing of the library): a page opened as /?token=… loads its CSS and ES
# modules by plain relative URLs, which cannot carry the token, so these pass without it (Host and Origin still
# apply; StaticFiles answers nothing outside its folder).
PUBLIC_PREFIX = "/static/"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server to this machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    return secrets.token_urlsafe(24)


def host_name(host_header: str) -> str:
    """The name in a Host header or an origin's netloc, without the port, lower case (`[::1]:80` → `::1`)."""
    try:
        return (urlsplit("//" + host_header).hostname or "").lower()
    except ValueError:
        return ""


class Guard:
    """ASGI middleware applying the module's rules to every HTTP request."""

    def __init__(self, app, bound_host: str, token: str | None):
        self.app = app
        self.token = token
        bound = bound_host.strip("[]").lower()  # the address as given to --host, never with a port
        self.any_host = bound in WILDCARD_HOSTS
        self.hosts = {*LOOPBACK_NAMES, bound.lower()}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await _send_error(send, 403, refusal)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if not self.any_host and host_name(host) not in self.hosts:
            return (f"this server answers to {', '.join(sorted(self.hosts))} only, not to the host name "
                    f"{host_name(host) or '(none)'}")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin) if origin != "null" else None
            if parts is None or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return f"requests from other sites are refused (origin {origin})"
        if self.token is not None and not scope.get("path", "").startswith(PUBLIC_PREFIX):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = headers.get(TOKEN_HEADER) or (query.get("token") or [""])[0]
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return "a valid token is needed: open the URL `clap serve` printed (it ends in ?token=…)"
        return None


async def _send_error(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
