"""`clap(...)`: the real typer app run in-process (CliRunner), asserting exit 0 unless `ok=False`; `fails(...)`:
the same, expecting a given exit code and message."""

from __future__ import annotations

from typer.testing import CliRunner

from clapcli.cli.main import app
from clapcli.errors import ClapError

runner = CliRunner()


def clap(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result


def fails(*args, code: int, match: str, input: str | None = None) -> str:
    """Run `clap ARGS…` in-process, expecting exit `code` (a ClapError's, as `clap`'s main reports it) and
    `match` in its output or error message; returns that text."""
    result = runner.invoke(app, [str(a) for a in args], input=input)
    exc = result.exception
    got = exc.exit_code if isinstance(exc, ClapError) else result.exit_code
    text = result.output + (str(exc) if exc is not None else "")
    assert got == code, text
    assert match in text, text
    return text
