"""`clap eval retrieval|zeroshot`: the paper's evaluation protocols on held-out data.

Thin: check the data and options (before the model loads), one call into `clapcli.eval.evaluate`, render
a rich table on a terminal or one JSON object with `--json`. Exit 1 when clips had to be skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..tagging.prompts import DEFAULT_TEMPLATE
from . import options, output

eval_app = typer.Typer(help="Evaluate a model: retrieval both ways on captioned clips, zero-shot classification.",
                       no_args_is_help=True)

RETRIEVAL_ROWS = (("R@1", "R@1"), ("R@5", "R@5"), ("R@10", "R@10"), ("mAP@10", "mAP@10"),
                  ("mean rank", "mean_rank"), ("median rank", "median_rank"))


@eval_app.command("retrieval")
def retrieval(
    data: Path = typer.Option(..., "--data", "-d", show_default=False,
                              help="Shards (a `clap shards make` output or a folder of tars) or a .csv/.jsonl "
                              "manifest with path and caption (a string or a JSON list)."),
    split: Optional[str] = typer.Option(None, "--split", show_default=False,
                                        help="train or val of a `shards make` output (default: val when it exists)."),
    model: Optional[str] = options.MODEL,
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    batch_size: int = options.BATCH_SIZE,
    tokenizer: Optional[str] = options.TOKENIZER,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Text→audio and audio→text R@1/5/10, mAP@10, mean and median rank; every caption of a clip counts."""
    from ..eval.evaluate import evaluate_retrieval, open_retrieval_data

    source = open_retrieval_data(data, split)
    clap_model = options.load(model, device, precision, tokenizer, engine=engine)
    with output.ProgressBar("evaluating", source.total) as bar:
        report = evaluate_retrieval(clap_model, source, batch_size=batch_size,
                                    progress=_advance_by(bar), on_skip=_warn_skip)
    summary = report.to_dict()
    summary["model"] = clap_model.model_ref
    summary["fingerprint"] = clap_model.fingerprint
    if as_json:
        output.json_line(summary)
    else:
        _render_retrieval(report, clap_model.model_ref)
    _exit_if_skipped(report.skipped)


@eval_app.command("zeroshot")
def zeroshot(
    data: Path = typer.Option(..., "--data", "-d", show_default=False,
                              help="Class subfolders, a path,label .csv/.jsonl, or ESC-50 (its folder or "
                              "meta/esc50.csv)."),
    labels: str = typer.Option(..., "--labels", "-l", show_default=False,
                               help="Label set: a built-in name (esc50, urbansound8k, ...), a comma list or @FILE."),
    template: Optional[List[str]] = typer.Option(
        None, "--template", "-t", show_default=False,
        help=f"Prompt template with one {{}}; repeat it to ensemble several (default {DEFAULT_TEMPLATE!r})."),
    exclude: Optional[str] = typer.Option(None, "--exclude", show_default=False,
                                          help="Comma list of labels to leave out (and their clips)."),
    fold: Optional[int] = typer.Option(None, "--fold", show_default=False,
                                       help="Only this fold of a manifest with a fold column (ESC-50: 1-5)."),
    per_class: bool = typer.Option(False, "--per-class", help="Also show the accuracy of every class."),
    model: Optional[str] = options.MODEL,
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    batch_size: int = options.BATCH_SIZE,
    tokenizer: Optional[str] = options.TOKENIZER,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Zero-shot classification: top-1/top-5 accuracy, mAP@10, per-class accuracy, the most confused pairs."""
    from ..tagging import resolve_labels
    from ..tagging.prompts import check_templates
    from ..eval.evaluate import evaluate_zeroshot, match_classes, read_zeroshot_data

    labelset = resolve_labels(labels)
    templates = check_templates(template)
    clips = read_zeroshot_data(data, fold)
    labelset, targets, clips = match_classes(clips, labelset, (exclude or "").split(","))
    clap_model = options.load(model, device, precision, tokenizer, engine=engine)
    with output.ProgressBar("evaluating", len(clips)) as bar:
        report = evaluate_zeroshot(clap_model, clips, targets, labelset, templates, batch_size=batch_size,
                                   data=str(data), fold=fold, progress=_advance_by(bar),
                                   on_skip=_warn_skip)
    summary = report.to_dict()
    summary["model"] = clap_model.model_ref
    summary["fingerprint"] = clap_model.fingerprint
    if as_json:
        output.json_line(summary)
    else:
        _render_zeroshot(report, clap_model.model_ref, per_class)
    _exit_if_skipped(report.skipped)


@eval_app.command("classifier")
def classifier(
    classifier_dir: Path = typer.Option(..., "--classifier", "-c", show_default=False,
                                        help="A classifier directory written by `clap finetune`."),
    data: Path = typer.Option(..., "--data", "-d", show_default=False,
                              help="Class subfolders or a path,label(s) .csv/.jsonl, with the classifier's labels."),
    device: str = options.DEVICE,
    batch_size: int = options.BATCH_SIZE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """A finetuned classifier on labelled clips: top-1/top-5 and the most confused pairs (mAP, mAUC multi-label)."""
    from ..train.finetune import evaluate_classifier

    metrics = evaluate_classifier(classifier_dir, data, device=device, batch_size=batch_size)
    metrics["classifier"] = str(classifier_dir)
    if as_json or not output.is_terminal():
        output.json_line(metrics)
        return
    from rich.table import Table

    table = Table(title=f"classifier {output.literal(classifier_dir)}: {metrics['clips']} clips, "
                        f"{metrics['labels']} labels",
                  title_justify="left", show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("top1", "top5", "mAP", "mAUC"):
        if isinstance(metrics.get(key), float):
            table.add_row(key, f"{metrics[key]:.4f}")
    for pair in metrics.get("confusions") or []:
        table.add_row(f"confused: {output.literal(pair.get('target'))} → {output.literal(pair.get('predicted'))}",
                      str(pair.get("count")))
    output.stdout_console().print(table)


def _advance_by(bar: output.ProgressBar):
    def advance(n: int) -> None:
        for _ in range(n):
            bar.advance()

    return advance


def _warn_skip(where: str, reason: str) -> None:
    output.stderr_console().print(f"[yellow]skipped:[/] {output.literal(where)}: {output.literal(reason)}",
                                  highlight=False, soft_wrap=True)


def _exit_if_skipped(skipped) -> None:
    if skipped:
        output.stderr_console().print(f"[red]{len(skipped)} clip(s) skipped[/] (listed above); the metrics "
                                      "leave them out", highlight=False)
        raise typer.Exit(1)


def _render_retrieval(report, model_ref: str) -> None:
    from rich.table import Table

    table = Table(title=f"retrieval: {report.audios} clips, {report.captions} captions", title_justify="left",
                  show_edge=False)
    table.add_column("metric")
    table.add_column("text→audio", justify="right")
    table.add_column("audio→text", justify="right")
    for name, key in RETRIEVAL_ROWS:
        t2a, a2t = report.metrics[f"t2a_{key}"], report.metrics[f"a2t_{key}"]
        fmt = "{:.2f}" if "rank" in key else "{:.4f}"
        table.add_row(name, fmt.format(t2a), fmt.format(a2t))
    table.add_row("mAP@10 (LAION's unsorted variant)", "", f"{report.metrics['a2t_mAP@10_laion_quirk']:.4f}")
    console = output.stdout_console()
    console.print(table)
    split = f" ({report.split} split)" if report.split else ""
    console.print(f"data: {output.display_path(report.data)}{split}", highlight=False, markup=False)
    console.print(f"model: {output.display_path(model_ref)}", highlight=False, markup=False)


def _render_zeroshot(report, model_ref: str, per_class: bool) -> None:
    from rich.table import Table

    fold = f", fold {report.fold}" if report.fold is not None else ""
    console = output.stdout_console()
    table = Table(title=f"zero-shot: {report.clips} clips, {len(report.labels)} labels", title_justify="left",
                  show_edge=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, key in (("top-1 accuracy", "top1"), ("top-5 accuracy", "top5"), ("top-10 accuracy", "top10"),
                      ("mAP@10", "mAP@10"), ("mean rank", "mean_rank")):
        table.add_row(name, f"{report.metrics[key]:.4f}")
    console.print(table)
    if per_class:
        classes = Table(title="per class", title_justify="left", show_edge=False)
        classes.add_column("label")
        classes.add_column("clips", justify="right")
        classes.add_column("accuracy", justify="right")
        for c in report.per_class:
            classes.add_row(output.literal(c["label"]), str(c["clips"]), f"{c['accuracy']:.3f}")
        console.print(classes)
    if report.confusions:
        pairs = Table(title="most confused", title_justify="left", show_edge=False)
        pairs.add_column("true label")
        pairs.add_column("predicted")
        pairs.add_column("clips", justify="right")
        for c in report.confusions:
            pairs.add_row(output.literal(c["target"]), output.literal(c["predicted"]), str(c["count"]))
        console.print(pairs)
    console.print(f"data: {output.display_path(report.data)}{fold}", highlight=False, markup=False)
    console.print(f"labels: {output.display_path(report.labelset)}", highlight=False, markup=False)
    console.print(f"templates: {output.display_path(' | '.join(report.templates))}", highlight=False, markup=False)
    console.print(f"model: {output.display_path(model_ref)}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
