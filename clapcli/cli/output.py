"""Shared CLI plumbing: error reporting, JSON lines, consoles on stderr/stdout."""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass

import click


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

    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.exceptions.Abort) or isinstance(exc, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    if isinstance(exc, click.ClickException):
        exc.show()
        return exc.exit_code
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
