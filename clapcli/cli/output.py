"""Shared CLI plumbing: error reporting, JSON lines, consoles on stderr/stdout."""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass

import typer


@dataclass
class _State:
    debug: bool = False


state = _State()


def stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    from rich.console import Console

    return Console()


def report_exception(exc: BaseException) -> int:
    """Print one line for an error (a traceback too with --debug) and return the exit code."""
    from ..errors import ClapError

    # typer ships its own click; its Exit/Abort/usage errors are matched through typer's names
    if isinstance(exc, typer.Exit):
        return exc.exit_code
    if isinstance(exc, (typer.Abort, KeyboardInterrupt)):
        print("aborted", file=sys.stderr)
        return 130
    if isinstance(exc, typer.TyperException) and hasattr(exc, "show"):
        exc.show()
        return getattr(exc, "exit_code", 2)
    if state.debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    if isinstance(exc, ClapError):
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def json_line(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def is_terminal() -> bool:
    return sys.stdout.isatty()
