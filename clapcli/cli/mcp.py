"""`clap mcp`: serve an index to an assistant over the Model Context Protocol (stdio), read-only.

Thin by design: the server and its tools are `clapcli.serve.mcp`; the SDK (the `mcp` extra) is imported there,
when the command runs.
"""

from __future__ import annotations

from typing import Optional

import typer

from .index import INDEX


def mcp_command(index: Optional[str] = INDEX) -> None:
    """Serve an index to an MCP client (an assistant) over stdio: tools search, similar, tag, dedupe and indexes,
    read-only, with the --json keys of clap search, clap tag, clap dedupe and clap index list. Needs the mcp
    extra: pip install 'clapcli\\[mcp]'."""
    from ..serve.mcp import serve

    serve(index)


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp_command)
