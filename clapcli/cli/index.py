"""`clap index`: embed a sound library into an index (incremental, crash-safe)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand

from . import options, output

INDEX = typer.Option(None, "--index", "-i", envvar="CLAP_INDEX",
                     help="Index name (under $CLAP_HOME/indexes; `clap index list` shows them) or directory. "
                     "(default: the index named default)")


def index_command(
    dirs: Optional[List[Path]] = typer.Argument(None, metavar="DIR", help="Folders (or files) to index, "
                                                "recursively (default: every folder the index was built from).",
                                                show_default=False),
    index: Optional[str] = INDEX,
    model: Optional[str] = typer.Option(None, "--model", "-m",
                                        help="Model for new indexes (default: $CLAP_MODEL, else "
                                             "laion/clap-htsat-fused); "
                                             "an existing index keeps the model it was built with."),
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    batch_size: int = options.BATCH_SIZE,
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0,
                                          help="Decoding processes beside the model (default: cores − 1, max 4)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", "-x", help="Glob of paths or names to skip "
                                                "(repeatable), e.g. '*.tmp' or '.git'."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Embed everything again into a new index that "
                                 "replaces the old one only on success (also the way to switch models, or to "
                                 "recover a damaged database, which is kept aside)."),
    prune_empty: bool = typer.Option(False, "--prune-empty", help="Confirm removing the indexed files of a "
                                     "folder that now lists no audio (otherwise kept: it may be an unmounted "
                                     "drive)."),
    forget: Optional[List[Path]] = typer.Option(None, "--forget", help="Drop a folder the index was built from, "
                                                "with its files (repeatable); the folder itself is untouched."),
    wait: bool = typer.Option(False, "--wait", help="Wait for another `clap index` on this index to finish."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    commit_every: int = typer.Option(64, "--commit-every", min=1, help="Files per database commit: a crash "
                                     "loses at most this many files' work."),
    tokenizer: Optional[str] = options.TOKENIZER,
) -> None:
    """Embed audio files under DIR… into an index (also `clap index list`, `clap index rm NAME`).

    Unchanged files are skipped; deleted ones, and indexed files that --exclude now matches, are removed.
    The index remembers its folders: without DIR it refreshes them all, and --rebuild must cover them all.

    `clap index list` shows the indexes, `clap index rm NAME` removes one; index a folder named list as ./list.
    """
    import os
    import sys

    from .. import dist
    from ..errors import ClapError
    from ..index.build import IndexRequest
    from ..index.indexer import IndexInterrupted, emptied_message
    from ..index.paths import resolve_index

    _check_subcommand_typo(dirs or [])
    request = IndexRequest(
        resolve_index(index), roots=dirs or [], model=model, device=device, precision=precision, engine=engine,
        tokenizer=tokenizer, exclude=exclude or (), batch_size=batch_size,
        workers=max(0, min(4, (os.cpu_count() or 1) - 1)) if workers is None else workers,
        rebuild=rebuild, wait=wait, prune_empty=prune_empty, forget=forget or (), commit_every=commit_every)
    if dist.launched():  # under torchrun/srun: every rank embeds a share, rank 0 commits and reports
        from ..index.distributed import build
    else:
        from ..index.build import build
    from .tag_index import tag_new_files, tag_sets_before  # the index's tag sets tag the files just added

    carried = tag_sets_before(request.index_dir) if rebuild else []  # a rebuild keeps the tag sets
    progress = _IndexProgress(enabled=not as_json)
    try:
        summary = build(request, on_plan=progress.on_plan, on_file=progress.on_file, on_audio=progress.on_audio)
    except IndexInterrupted as interrupted:
        progress.stop()
        print(interrupted.message, file=sys.stderr)
        raise typer.Exit(130) from None
    finally:
        progress.stop()
    if summary is None:  # a rank other than 0 of a sharded run
        return
    if as_json:
        tagged = tag_new_files(request.index_dir, as_json, carried)
        output.json_line({**summary.to_dict(), **({"tags": tagged} if tagged else {})})
    else:
        _print_summary(summary)
        tag_new_files(request.index_dir, as_json, carried)
    if summary.emptied_roots:
        raise ClapError(emptied_message(summary.emptied_roots, "nothing under it was pruned"))


def _check_subcommand_typo(dirs: list[Path]) -> None:
    """`clap index lst`: a first argument that is no path but close to `list` or `rm` is a mistyped subcommand."""
    import difflib
    import os

    from ..errors import UsageError
    from .index_admin import SUBCOMMANDS

    if not dirs or os.path.lexists(dirs[0]):
        return
    close = difflib.get_close_matches(os.fspath(dirs[0]), SUBCOMMANDS, n=1, cutoff=0.6)
    if close:
        raise UsageError(f"no such file or directory: {output.display_path(dirs[0])}; did you mean "
                         f"`clap index {close[0]}`?")


def _print_summary(s) -> None:
    con = output.stderr_console()
    rate = f", {output.clock(s.audio_seconds)} of audio at {_speed(s.audio_seconds / s.seconds)}" \
        if s.audio_seconds and s.seconds else ""
    partial = f", {len(s.partial)} partial" if s.partial else ""
    excluded = f" ({s.removed_excluded} excluded)" if s.removed_excluded else ""
    con.print(f"[bold]{output.literal(s.index)}[/]: {s.added} added, {s.updated} updated, "
              f"{s.removed} removed{excluded}, "
              f"{s.unchanged + s.touched} unchanged, {len(s.skipped)} skipped{partial} in {s.seconds:.1f} s{rate}",
              highlight=False)
    errors = f", {len(s.unreadable)} unreadable (listed by --json)" if s.unreadable else ""
    partial = f", {len(s.partial_files)} partly decoded (listed by --json)" if s.partial_files else ""
    con.print(f"now {output.plural(s.total_files, 'file')}, {output.plural(s.total_segments, 'segment')}"
              f"{errors}{partial}; "
              f"model {output.literal(s.model)}",
              highlight=False, soft_wrap=True)
    for folder, n in s.forgotten:
        con.print(f"forgot {output.literal(folder)}: {output.plural(n, 'indexed file')} under it left the index",
                  highlight=False, soft_wrap=True)
    if s.kept_unread:
        con.print(f"[yellow]kept the last embeddings of {len(s.kept_unread)} indexed files that could not be read "
                  "this run[/] (listed below as skipped; the next run tries them again)", highlight=False,
                  soft_wrap=True)
    if s.kept_aside:
        con.print(f"[yellow]the damaged database was kept as {output.literal(s.kept_aside)}[/]", highlight=False,
                  soft_wrap=True)
    if s.lossy_precisions:
        con.print(f"[yellow]note:[/] this index holds vectors computed at {' and '.join(s.lossy_precisions)}, which "
                  "depend on their batch mates: after a resumed or incremental run it may differ slightly from a "
                  "clean build (--rebuild at the default fp32 is exact)", highlight=False, soft_wrap=True)
    for path, reason in s.skipped[:20]:
        con.print(f"  [yellow]skipped[/] {output.literal(path)}: {output.literal(reason)}",
                  highlight=False, soft_wrap=True)
    if len(s.skipped) > 20:
        con.print(f"  … and {len(s.skipped) - 20} more (see --json)", highlight=False)
    for path, reason in s.partial[:20]:
        con.print(f"  [yellow]partial[/] {output.literal(path)}: {output.literal(reason)}", highlight=False,
                  soft_wrap=True)
    if len(s.partial) > 20:
        con.print(f"  … and {len(s.partial) - 20} more partly decoded (see --json)", highlight=False)
    for path, reason in s.kept_previous[:20]:
        con.print(f"  [yellow]kept previous embeddings[/] {output.literal(path)}: its new version "
                  f"failed ({output.literal(reason)})", highlight=False, soft_wrap=True)
    if s.retried:
        con.print(f"tried {s.retried} earlier environmental failures again", highlight=False)
    retry = [f"{n} {what}" for n, what in ((len(s.retry_files), "environmental failures (no space, I/O, memory…)"),
                                           (len(s.kept_previous), "files whose previous embeddings were kept"))
             if n]
    if retry:
        con.print(f"to be tried again on the next run: {', '.join(retry)}", highlight=False)


class _IndexProgress:
    """A bar over the bytes of the files to embed (known before decoding, and close to proportional to audio
    time within a file), moved as each file's audio is decoded, so a two-hour recording moves it too; beside
    it files done, audio embedded and the speed against real time. Only on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None
        self.sizes: dict[str, int] = {}  # path -> bytes, of the files to embed
        self.moved: dict[str, float] = {}  # path -> bytes the bar has advanced for it so far
        self.done = 0
        self.audio = 0.0  # seconds decoded

    def on_plan(self, plan) -> None:
        import sys

        if not self.enabled or not plan.to_embed or not sys.stderr.isatty():
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.sizes = {str(e.path): max(int(e.size), 1) for e in plan.to_embed}
        self._bar = Progress(TextColumn("embedding"), BarColumn(), TextColumn("{task.fields[files]}"),
                             TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                             console=output.stderr_console(), transient=True)
        self._task = self._bar.add_task("embedding", total=sum(self.sizes.values()), files="", rate="")
        self._bar.start()
        self._refresh(0.0)

    def on_audio(self, path: str, seconds: float, expected: float) -> None:
        self.audio += seconds
        size = self.sizes.get(path)
        if self._bar is None or size is None or expected <= 0:
            return
        moved = self.moved.get(path, 0.0)
        step = min(size * seconds / expected, size * 0.99 - moved)  # the file's last bytes move when it is done
        if step > 0:
            self.moved[path] = moved + step
            self._refresh(step)

    def on_file(self, result) -> None:
        self.done += 1
        if self._bar is not None:
            self._refresh(self.sizes.get(result.path, 0) - self.moved.pop(result.path, 0.0))

    def _refresh(self, advance: float) -> None:
        elapsed = max(self._bar.tasks[0].elapsed or 0.0, 1e-6)
        rate = f"{output.clock(self.audio)} audio · {_speed(self.audio / elapsed)}" if self.audio else ""
        self._bar.update(self._task, advance=advance, files=f"{self.done}/{len(self.sizes)} files", rate=rate)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _speed(ratio: float) -> str:
    """Seconds of audio embedded per second of wall time, to two significant figures: `37× real time`,
    `0.14× real time` (a slow machine or model is not rounded to 0)."""
    return f"{ratio:.2g}× real time" if ratio < 10 else f"{ratio:.0f}× real time"


class _IndexCommand(TyperCommand):
    """`clap index DIR…`, or `clap index list|rm …` when the first argument is that word and not a path."""

    def make_context(self, info_name, args, parent=None, **extra):
        from .index_admin import dispatch

        admin = dispatch(args)
        if admin is not None:
            return admin.make_context(info_name, list(args), parent=parent, **extra)
        return super().make_context(info_name, args, parent=parent, **extra)


def register(app: typer.Typer) -> None:
    app.command("index", cls=_IndexCommand)(index_command)
