"""`clap tag`: zero-shot tags for audio files from a built-in or custom label set.

Thin by design: parse the options, call `clapcli.tagging.tag_files`, render each result as it comes.
numpy, torch and the model are imported inside the command, so `clap --help` stays instant.
"""

from __future__ import annotations

import csv
import sys
from typing import TYPE_CHECKING, List, Optional, TextIO

import typer

from ..errors import UsageError
from ..tagging.prompts import DEFAULT_TEMPLATE
from . import options, output

if TYPE_CHECKING:
    from ..tagging import FileTags

DEFAULT_TOP = 5  # labels shown per file (and per window) in single-label mode


def register(app: typer.Typer) -> None:
    """Add `tag` to the main `clap` app."""
    app.command("tag")(tag_command)


def tag_command(
    files: Optional[List[str]] = typer.Argument(None, metavar="PATH", help="Audio files, or folders to walk for "
                                                "audio files as `clap index` does.", show_default=False),
    labels: Optional[str] = typer.Option(
        None, "--labels", "-l", show_default=False,
        help="Label set: a built-in name (see --list-labelsets), a comma list 'dog,rain,siren', "
        "or @FILE with one label per line.",
    ),
    top: Optional[int] = typer.Option(
        None, "--top", "-k", min=1, show_default=False,
        help=f"Labels to show per file and per window (default {DEFAULT_TOP}; with --multi-label, "
        "all above the threshold).",
    ),
    template: Optional[List[str]] = typer.Option(
        None, "--template", "-t", show_default=False,
        help="Prompt template with one {} for the label; repeat it to ensemble several "
        f"(default {DEFAULT_TEMPLATE!r}).",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per file per line."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV with a header, one row per (file, label)."),
    timeline: bool = typer.Option(False, "--timeline", help="Also tag each window of files longer than one window "
                                  "(the model's clip length: 10 s for LAION-CLAP); on a terminal, neighbouring "
                                  "windows with the same labels share a row."),
    multi_label: bool = typer.Option(
        False, "--multi-label",
        help="Report every label whose cosine is at least --threshold (for sets where several labels apply, "
        "such as audioset and fsd50k) instead of the top labels by probability.",
    ),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", show_default=False,
        help="Keep labels scoring at least this: a probability (0-1) normally, a cosine (-1..1) with "
        "--multi-label, where it is required.",
    ),
    classifier: Optional[str] = typer.Option(
        None, "--classifier", "-c", show_default=False,
        help="Tag with a classifier directory from `clap finetune` instead of a zero-shot label set "
        "(its own model is used; a --model with other weights is refused).",
    ),
    index: Optional[str] = typer.Option(
        None, "--index", "-i", show_default=False,
        help="Tag every file of this index (a name, see `clap index list`, or a directory) from its stored vectors "
        "and store the top labels (--top) in it, for `clap search --tag`; the files `clap index` adds later are "
        "tagged too. Give no PATH with it.",
    ),
    forget: Optional[str] = typer.Option(
        None, "--forget", show_default=False, metavar="SET",
        help="With --index: drop a tag set (its id or name, see `clap index list`) and its tags; `clap index` "
        "then stops tagging with it.",
    ),
    model: Optional[str] = options.MODEL,
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    batch_size: int = options.BATCH_SIZE,
    tokenizer: Optional[str] = options.TOKENIZER,
    list_labelsets: bool = typer.Option(
        False, "--list-labelsets", help="List the built-in label sets with their sizes and exit."
    ),
) -> None:
    """Zero-shot tags for audio files: labels with probabilities (softmax of logit-scaled cosines) and cosines.

    With --classifier DIR, the labels and probabilities of a head trained by `clap finetune` instead.

    With --index, every file of an index is tagged from its stored vectors (no audio work) and its top labels are
    stored in the index, for `clap search --tag`.

    A table per file on a terminal, JSON lines when piped or with --json, CSV with --csv.
    """
    if list_labelsets:
        _print_labelsets(as_json)
        return
    if forget is not None:
        if index is None:
            raise UsageError("--forget drops a tag set of an index: give the index with --index")
        from .tag_index import forget_tag_set

        forget_tag_set(index, forget, as_json)
        return
    if index is not None:
        if files:
            raise UsageError("--index tags the files of the index: give no PATH with it")
        if multi_label or threshold is not None or timeline or as_csv:
            raise UsageError("--index stores each file's top labels (--top): --multi-label, --threshold, --timeline "
                             "and --csv do not apply")
        from .tag_index import tag_index

        if tag_index(index, labels, classifier, template, top or DEFAULT_TOP, model, device, precision, engine,
                     tokenizer, batch_size, as_json):
            raise typer.Exit(1)
        return
    if not files:
        raise UsageError("give at least one audio file (or --list-labelsets)")
    if as_json and as_csv:
        raise UsageError("--json and --csv cannot be used together")
    if classifier is not None:
        _run_classifier(classifier, files, labels, template, top, multi_label, threshold, timeline, model,
                        device, precision, batch_size, tokenizer, as_json, as_csv, engine)
        return
    if labels is None:
        raise UsageError("choose a label set with --labels: a built-in name (see --list-labelsets), "
                        "a comma list 'dog,rain,siren' or @FILE")
    if multi_label and threshold is None:
        raise UsageError("--multi-label needs --threshold, a cosine such as 0.2: CLAP has no calibrated "
                        "per-label probability, so the cut-off depends on the model")
    if threshold is not None:
        low, what = (-1.0, "a cosine") if multi_label else (0.0, "a probability")
        if not low <= threshold <= 1.0:
            raise UsageError(f"--threshold {threshold:g} is not {what} in [{low:g}, 1]")
    top_k = top if top is not None else (None if multi_label else DEFAULT_TOP)

    from ..tagging import resolve_labels
    from ..tagging.prompts import check_templates

    labelset = resolve_labels(labels)  # before loading the model: a typo fails in milliseconds
    templates = check_templates(template)
    files, unreadable = expand_paths(files)  # before the model loads: a typo fails at once
    clap_model = options.load(model, device, precision, tokenizer, engine=engine)
    failed = _run(clap_model, files, labelset, templates, top_k, multi_label, threshold, timeline, batch_size,
                  as_json, as_csv)
    if failed or unreadable:
        raise typer.Exit(1)


def expand_paths(paths: list[str]) -> tuple[list[str], int]:
    """The files to tag (`index.scan.audio_files`); folders that cannot be read are reported on stderr. Returns
    (files, how many paths could not be read)."""
    from ..index.scan import audio_files

    problems: list = []
    files = audio_files(paths, problems, shown=output.display_path)
    for problem in problems:
        output.stderr_console().print(f"[red]skipped:[/] {output.literal(problem.path)}: "
                                      f"{output.literal(problem.reason)}", highlight=False, soft_wrap=True)
    return files, len(problems)


def _run_classifier(directory, files, labels, template, top, multi_label, threshold, timeline, model, device,
                    precision, batch_size, tokenizer, as_json, as_csv, engine=None) -> None:
    """`--classifier`: the head's softmax (or, for multi-label heads, sigmoid) probabilities as the scores."""
    from ..engine.load import load_classifier
    from ..models.classifier import read_classifier

    if labels is not None or template:
        raise UsageError("--classifier brings its own labels: drop --labels and --template")
    if threshold is None and multi_label:
        threshold = 0.5  # a multi-label head's sigmoid is a per-label probability
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold:g} is not a probability in [0, 1]")
    top_k = top if top is not None else (None if multi_label else DEFAULT_TOP)
    read_classifier(directory)  # a wrong directory fails before any model loads
    files, unreadable = expand_paths(files)
    clap_model = options.load(model, device, precision, tokenizer, engine=engine) if model else None
    scorer = load_classifier(directory, model=clap_model, device=device, precision=precision, engine=engine)
    failed = _run(scorer.model, files, None, None, top_k, multi_label, threshold, timeline, batch_size,
                  as_json, as_csv, scorer=scorer)
    if failed or unreadable:
        raise typer.Exit(1)


def _run(model, files, labelset, templates, top_k, multi_label, threshold, timeline, batch_size,
         as_json, as_csv, scorer=None) -> int:
    """Tag and render file by file; returns the number of files that failed."""
    from ..tagging import tag_files

    out, err = output.stdout_console(), output.stderr_console()
    # stdout goes through the bar only when both are on the terminal; piped output stays plain.
    progress = output.ProgressBar("tagging", len(files), redirect_stdout=True, within_files=True).start()
    failed = 0
    csv_writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if csv_writer is not None:
        from ..tagging import CSV_HEADER

        csv_writer.writerow(CSV_HEADER)
    try:
        for result in tag_files(model, files, labelset, templates, top_k=top_k, multi_label=multi_label,
                                threshold=threshold, timeline=timeline, batch_size=batch_size, scorer=scorer,
                                on_audio=progress.on_audio):
            if result.error is not None:
                failed += 1
                err.print(f"[red]skipped:[/] {output.literal(result.path)}: {output.literal(result.error)}",
                          highlight=False, soft_wrap=True)
            elif result.partial is not None:
                err.print(f"[yellow]partial:[/] {output.literal(result.path)}: {output.literal(result.partial)}",
                          highlight=False, soft_wrap=True)
            if as_json or (csv_writer is None and not out.is_terminal):  # pipes get JSON lines
                write_json(result, sys.stdout)
            elif csv_writer is not None:
                csv_writer.writerows(result.csv_rows())
                sys.stdout.flush()
            elif result.error is None:
                print_tables(out, result)
            progress.advance(path=result.path)
    finally:
        progress.stop()
    return failed


def write_json(result: FileTags, stream: TextIO) -> None:
    """One `--json` line: path, duration, labels, then timeline (with --timeline) and error (if failed)."""
    stream.write(output.json_text(result.to_dict()) + "\n")
    stream.flush()


def print_tables(console, result: FileTags) -> None:
    """One tagged file on a terminal: its path on a line of its own, printed whole (a table title would break
    a long path mid-word at 80 columns; the terminal wraps it instead, so it can still be copied), then its
    tables."""
    duration = "" if result.duration is None else f" ({output.clock(result.duration)})"
    console.print(f"[bold]{output.literal(result.path)}[/]{duration}", highlight=False, soft_wrap=True)
    for renderable in render_tables(result):
        console.print(renderable)


def render_tables(result: FileTags) -> list:
    """Rich tables for one tagged file: its labels, then its timeline when there is one."""
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("label", overflow="fold")
    table.add_column("prob", justify="right")
    table.add_column("cosine", justify="right")
    for s in result.labels:
        table.add_row(output.literal(s.label), f"{s.prob:.3f}", "" if s.cosine is None else f"{s.cosine:.3f}")
    if not result.labels:
        table.add_row("(no label above the threshold)", "", "")
    tables = [table]
    if result.timeline is not None:
        windows = Table(title="timeline", title_justify="left", show_edge=False)
        windows.add_column("time", justify="right", no_wrap=True)
        windows.add_column("labels (prob)", overflow="fold")
        for start, end, labels in merged_timeline(result.timeline):
            tags = ", ".join(f"{output.literal(label)} ({prob:.2f})" for label, prob in labels)
            windows.add_row(output.clock_range(start, end), tags)
        tables.append(windows)
    return tables


def merged_timeline(windows) -> list[tuple[float, float, list[tuple[str, float]]]]:
    """The timeline as a person reads it: neighbouring windows that show the same labels in the same order become
    one stretch (start of the first, end of the last) with each label's mean probability over them, so a
    20-minute take of rain is one row, not 471."""
    merged: list[tuple[float, float, list[tuple[str, float]]]] = []
    runs: list[list] = []
    for w in windows:
        names = [s.label for s in w.labels]
        if runs and [label for label, _ in merged[-1][2]] == names and w.start <= merged[-1][1]:
            runs[-1].append(w)
            merged[-1] = (merged[-1][0], w.end, merged[-1][2])
        else:
            runs.append([w])
            merged.append((w.start, w.end, [(s.label, s.prob) for s in w.labels]))
    return [(start, end, [(label, sum(w.labels[i].prob for w in run) / len(run)) for i, (label, _) in
                          enumerate(labels)]) for (start, end, labels), run in zip(merged, runs)]


def _print_labelsets(as_json: bool) -> None:
    from ..tagging import builtin_labelsets

    sets = builtin_labelsets()
    if as_json:
        for name, size in sets.items():
            output.json_line({"name": name, "size": size})
        return
    if not output.is_terminal():
        for name, size in sets.items():
            sys.stdout.write(f"{name}\t{size}\n")
        return
    from rich.table import Table

    table = Table(show_edge=False)
    table.add_column("label set")
    table.add_column("labels", justify="right")
    for name, size in sets.items():
        table.add_row(name, str(size))
    output.stdout_console().print(table)
