"""`clap index DIR… --watch`: the watch session's output, one line (or JSON object) per update, and its stop
on Ctrl-C or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import sys
import time

from . import output


def watch(request, debounce: float, as_json: bool, print_summary, progress_bar) -> None:
    """Run the watch session of `request` until Ctrl-C or SIGTERM; both end it with exit status 0, after the
    run in flight has committed what it finished. The first run is reported by `print_summary(summary)` as
    `clap index` reports a run; each run shows a fresh `progress_bar(enabled)` (`clap index`'s)."""
    from ..index.indexer import IndexInterrupted
    from ..index.watch import watch_index

    report = _WatchReport(as_json, print_summary, progress_bar, request.index_dir)
    try:
        with _terminate_as_interrupt():
            updates = watch_index(request, debounce=debounce, on_update=report.update, on_watching=report.watching,
                                  on_plan=report.progress.on_plan, on_file=report.progress.on_file,
                                  on_audio=report.progress.on_audio)
    except IndexInterrupted as interrupted:  # during a run: what it finished is committed
        report.progress.stop()
        print(interrupted.message, file=sys.stderr)
        updates = report.updates
    except KeyboardInterrupt:
        updates = report.updates
    finally:
        report.progress.stop()
    if not as_json:
        print(f"stopped watching after {output.plural(updates, 'update')}", file=sys.stderr)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a service manager stopping the watch) ends it as Ctrl-C does."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _WatchReport:
    def __init__(self, as_json: bool, print_summary, progress_bar, index_dir):
        self.as_json = as_json
        self.index_dir = index_dir
        self.print_summary = print_summary
        self.progress = _RunProgress(progress_bar, enabled=not as_json)
        self.updates = 0
        self._emptied: list = []  # the last update's emptied roots: told again only when they change
        self._missing: list = []

    def watching(self, roots) -> None:
        if not self.as_json:
            where = output.literal(roots[0]) if len(roots) == 1 else output.plural(len(roots), "folder")
            output.stderr_console().print(f"watching {where} for changes (Ctrl-C stops)", highlight=False,
                                          soft_wrap=True)

    def update(self, update) -> None:
        from ..index.indexer import emptied_message
        from .tag_index import tag_new_files

        self.progress.stop()
        if update.summary.seconds:
            self.updates += 1
        back = [root for root in self._missing if root not in update.missing_roots]
        gone = [root for root in update.missing_roots if root not in self._missing]
        self._missing = update.missing_roots
        s = update.summary
        # the index's tag sets tag what the run added or embedded again (stored vectors: no model), as after `clap
        # index`; printed on stderr before the update's line, or as its "tags" in --json
        tagged = tag_new_files(self.index_dir, self.as_json) if s.added or s.updated or s.copied else []
        if self.as_json:
            if update.changed or back:
                output.json_line({**update.to_dict(), **({"tags": tagged} if tagged else {})})
            return
        con = output.stderr_console()
        for root in gone:
            con.print(f"[yellow]{output.literal(root)} is gone (a card ejected?): its indexed files stay in the index, "
                      "and it is watched again when it is back[/]", highlight=False, soft_wrap=True)
        for root in back:
            con.print(f"{output.literal(root)} is back", highlight=False, soft_wrap=True)
        if update.first:
            self.print_summary(s)
        elif s.seconds and (s.added or s.updated or s.removed or s.moved or s.copied or s.skipped):
            skipped = f", {len(s.skipped)} skipped" if s.skipped else ""
            moved = "".join(f", {n} {what}" for n, what in ((s.moved, "moved"), (s.copied, "copied")) if n)
            con.print(f"{time.strftime('%H:%M:%S')} +{s.added} ~{s.updated} -{s.removed}{moved}{skipped} "
                      f"({s.seconds:.1f} s)",
                      highlight=False)
            for path, reason in s.skipped[:20]:
                con.print(f"  [yellow]skipped[/] {output.literal(path)}: {output.literal(reason)}", highlight=False,
                          soft_wrap=True)
        if s.emptied_roots and s.emptied_roots != self._emptied:
            con.print(f"[yellow]{output.literal(emptied_message(s.emptied_roots, 'nothing under it was pruned'))}[/]",
                      highlight=False, soft_wrap=True)
        self._emptied = s.emptied_roots
        if update.error:
            con.print(f"[red]update failed:[/] {output.literal(update.error)} (tried again on the next change)",
                      highlight=False, soft_wrap=True)


class _RunProgress:
    """`clap index`'s progress bar, a fresh one for each run of the session."""

    def __init__(self, progress_bar, enabled: bool):
        self.progress_bar = progress_bar
        self.enabled = enabled
        self._bar = None

    def on_plan(self, plan) -> None:
        self.stop()
        self._bar = self.progress_bar(self.enabled)
        self._bar.on_plan(plan)

    def on_file(self, result) -> None:
        if self._bar is not None:
            self._bar.on_file(result)

    def on_audio(self, path: str, seconds: float, expected: float) -> None:
        if self._bar is not None:
            self._bar.on_audio(path, seconds, expected)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
