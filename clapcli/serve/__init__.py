"""Reaching an index from other programs, read-only: `clap serve` (a Starlette app and the page it ships)
and `clap mcp` (a Model Context Protocol server over stdio). Both answer with the CLI's `--json` keys and
never write an index or a file of the library."""
