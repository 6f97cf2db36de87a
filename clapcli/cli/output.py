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
    sys.stdout.write(json_text(obj) + "\n")


def json_text(obj) -> str:
    """One line of JSON that is valid UTF-8 even for file names that are not (see `portable`)."""
    return json.dumps(portable(obj), ensure_ascii=False)


def portable(obj):
    """`obj` with every string made valid UTF-8 for JSON.

    A file name that is not valid UTF-8 reaches Python with its bad bytes as lone surrogates, which JSON
    cannot carry portably. Every "path" entry holding one becomes the name with U+FFFD for the bad bytes
    (for people) plus "path_bytes", the name's exact bytes in hex (for scripts:
    `bytes.fromhex(r["path_bytes"])`); other strings (an error that quotes the name) get the U+FFFDs only.
    """
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key == "path" and isinstance(value, str) and not _is_utf8(value):
                raw = _raw_bytes(value)
                out[key], out["path_bytes"] = raw.decode("utf-8", "replace"), raw.hex()
            else:
                out[key] = portable(value)
        return out
    if isinstance(obj, (list, tuple)):
        if obj and isinstance(obj[0], (int, float)):  # an embedding: numbers only
            return obj
        return [portable(v) for v in obj]
    if isinstance(obj, str) and not _is_utf8(obj):
        return _raw_bytes(obj).decode("utf-8", "replace")
    return obj


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raw_bytes(text: str) -> bytes:
    """The bytes a surrogate-escaped str stands for (as os.fsencode does on POSIX)."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that no byte decoded to
        return text.encode("utf-8", "surrogatepass")


def display_path(path) -> str:
    """A path as text any terminal or log can print: bytes that are not UTF-8 shown as U+FFFD."""
    text = str(path)
    return text if _is_utf8(text) else _raw_bytes(text).decode("utf-8", "replace")


def is_terminal() -> bool:
    return sys.stdout.isatty()


class ProgressBar:
    """Files done / total, files/s, an optional rate text and ETA on stderr.

    Shown only when stderr is a terminal and there is more than one item; otherwise every call is a no-op,
    so piped and scripted runs print nothing but their results."""

    def __init__(self, label: str, total: int = 0, redirect_stdout: bool = False):
        self.label, self.total, self.redirect_stdout = label, total, redirect_stdout
        self._bar = None

    def start(self, total: int | None = None) -> "ProgressBar":
        if total is not None:
            self.total = total
        if self._bar is None and self.total > 1 and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(self.label), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=stderr_console(), transient=True,
                redirect_stdout=self.redirect_stdout and sys.stdout.isatty(), redirect_stderr=False,
            )
            self._task = self._bar.add_task(self.label, total=self.total, rate="")
            self._bar.start()
        return self

    def advance(self, extra: str = "") -> None:
        if self._bar is None:
            return
        task = self._bar.tasks[0]
        done, elapsed = task.completed + 1, max(task.elapsed or 0.0, 1e-6)
        rate = f"{done / elapsed:.1f} files/s" + (f" · {extra}" if extra else "")
        self._bar.update(self._task, advance=1, rate=rate)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
