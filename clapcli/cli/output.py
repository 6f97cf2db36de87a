"""Shared CLI plumbing: error reporting, JSON lines, consoles on stderr/stdout."""

from __future__ import annotations

import json
import re
import sys
import traceback
from dataclasses import dataclass

import typer


@dataclass
class _State:
    debug: bool = False


state = _State()


def stderr_console():
    """A rich console on stderr; off a terminal (a log file, a pipe) lines are not wrapped at 80 columns."""
    from rich.console import Console

    return Console(stderr=True, soft_wrap=not sys.stderr.isatty())


def stdout_console():
    from rich.console import Console

    return Console(soft_wrap=not sys.stdout.isatty())


def clock(seconds: float) -> str:
    """A time or a length as every table and summary writes it: `m:ss.ss`, or `h:mm:ss.ss` from an hour on
    (hundredths, so 0.156 s and 0.196 s read apart: `0:00.16`, `0:00.20`)."""
    hundredths = round(seconds * 100)
    minutes, rest = divmod(hundredths, 6000)
    hours, minutes = divmod(minutes, 60)
    secs = f"{rest // 100:02d}.{rest % 100:02d}"
    return f"{hours}:{minutes:02d}:{secs}" if hours else f"{minutes}:{secs}"


def clock_range(start: float, end: float) -> str:
    """A stretch of a file: `2:53.40–2:55.90`."""
    return f"{clock(start)}–{clock(end)}"


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 file`, `2 files` (`nouns` for an irregular plural)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


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
        print(f"error: {error_text(exc)}", file=sys.stderr)
        return exc.exit_code
    print(f"error: {type(exc).__name__}: {error_text(exc)} (run with --debug for the traceback)", file=sys.stderr)
    return 1


def error_text(exc: BaseException) -> str:
    """An error's message as the terminal may show it: control characters a quoted file name brings (an escape
    sequence) escaped, bytes that are not UTF-8 as U+FFFD; newlines kept (a checkpoint diff spans lines)."""
    text = str(exc)
    return escape_controls(text if _is_utf8(text) else _raw_bytes(text).decode("utf-8", "replace"), keep="\n")


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: what can move a cursor or start an escape
_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_controls(text: str, keep: str = "") -> str:
    """`text` with each control character shown as an escape (`\\n`, `\\t`, `\\x1b`, ...), except those in `keep`:
    a file name cannot recolour the terminal, move its cursor or forge a line of output."""
    return _CONTROL.sub(lambda m: m.group() if m.group() in keep else
                        _CONTROL_NAMES.get(m.group(), f"\\x{ord(m.group()):02x}"), text)


def has_controls(text: str) -> bool:
    return _CONTROL.search(text) is not None


def display_path(path) -> str:
    """A path (or any text that may quote one) as a terminal or log can print it: bytes that are not UTF-8 shown
    as U+FFFD, control characters escaped."""
    text = str(path)
    return escape_controls(text if _is_utf8(text) else _raw_bytes(text).decode("utf-8", "replace"))


def literal(text) -> str:
    """User-given text (a path, a label, a query, an error that quotes one) made safe to embed in rich markup: it
    shows as written (`x[/].wav` is a name, not a closing tag) with control characters escaped."""
    from rich.markup import escape

    return escape(display_path(text))


def write_path(path: str, null: bool) -> bool:
    """One `--paths` entry on stdout: the name's exact bytes, ended by NUL with `null` (`-0`), else by a newline.

    A name holding a control character (a newline would forge a second path in `| xargs`) is written with them
    escaped instead, which names no file; returns True then, so the caller can point to `-0`."""
    forged = not null and has_controls(path)
    data = (display_path(path) + "\n").encode("utf-8") if forged else _raw_bytes(path) + (b"\0" if null else b"\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(data)
    return forged


def is_terminal() -> bool:
    return sys.stdout.isatty()


class ProgressBar:
    """Files done / total, files/s, an optional rate text and ETA on stderr.

    Shown only when stderr is a terminal and there is more than one item (or, with `within_files`, at least one:
    the bar then moves inside each file as its audio decodes, so a 20-minute take does not sit at 0/1); otherwise
    every call is a no-op, so piped and scripted runs print nothing but their results."""

    def __init__(self, label: str, total: int = 0, redirect_stdout: bool = False, within_files: bool = False,
                 unit: str = "files"):
        self.label, self.total, self.redirect_stdout, self.within_files = label, total, redirect_stdout, within_files
        self.unit = unit  # what the rate counts: `12.0 files/s`
        self._bar = None
        self._done = 0
        self._moved: dict[str, float] = {}  # path -> the part of one file the bar has advanced for it so far

    def start(self, total: int | None = None) -> "ProgressBar":
        if total is not None:
            self.total = total
        if self._bar is None and self.total > (0 if self.within_files else 1) and sys.stderr.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn(self.label), BarColumn(), TextColumn("{task.fields[files]}"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                console=stderr_console(), transient=True,
                redirect_stdout=self.redirect_stdout and sys.stdout.isatty(), redirect_stderr=False,
            )
            self._task = self._bar.add_task(self.label, total=self.total, rate="", files=f"0/{self.total}")
            self._bar.start()
        return self

    def on_audio(self, path: str, seconds: float, expected: float) -> None:
        """`embed_files`' on_audio hook: move the bar by the decoded part of a file (up to 99% of it)."""
        if self._bar is None or expected <= 0:
            return
        moved = self._moved.get(path, 0.0)
        step = min(seconds / expected, 0.99 - moved)
        if step > 0:
            self._moved[path] = moved + step
            self._bar.update(self._task, advance=step)

    def advance(self, extra: str = "", path: str | None = None) -> None:
        """One item done (`path`: the file whose partial moves by `on_audio` this completes)."""
        if self._bar is None:
            return
        self._done += 1
        elapsed = max(self._bar.tasks[0].elapsed or 0.0, 1e-6)
        rate = f"{self._done / elapsed:.1f} {self.unit}/s" + (f" · {extra}" if extra else "")
        step = 1.0 - self._moved.pop(path, 0.0) if path is not None else 1.0
        self._bar.update(self._task, advance=step, rate=rate, files=f"{self._done}/{self.total}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "ProgressBar":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
