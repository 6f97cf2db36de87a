"""`clap(...)`: the real typer app run in-process (CliRunner), asserting exit 0 unless `ok=False`."""

from __future__ import annotations

from typer.testing import CliRunner

from clapcli.cli.main import app

runner = CliRunner()


def clap(*args, ok=True):
    result = runner.invoke(app, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    return result
