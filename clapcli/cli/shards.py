"""`clap shards make|info`: write and check webdataset shards in the LAION-CLAP format."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from . import output

shards_app = typer.Typer(help="Write and check training data shards (webdataset tars, LAION-CLAP format).",
                         no_args_is_help=True)


class _Progress:
    """Adapts make_shards' progress(stage, n) calls to one ProgressBar per stage."""

    def __init__(self):
        self.bar: output.ProgressBar | None = None

    def __call__(self, stage: str, n: int) -> None:
        if stage:
            self.stop()
            self.bar = output.ProgressBar(stage, n).start()
            return
        for _ in range(n):
            if self.bar is not None:
                self.bar.advance()

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


@shards_app.command("make")
def make(
    src: Path = typer.Argument(..., metavar="SRC", help="A .csv/.jsonl manifest, or a folder of audio.",
                               show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: shards go to OUT/train (and OUT/val).",
                             show_default=False),
    captions: Optional[Path] = typer.Option(None, "--captions", help="Manifest giving the captions/tags of a "
                                            "folder's files (default: x.txt / x.json sidecars)."),
    shard_size: int = typer.Option(512, "--shard-size", min=1, help="Samples per shard."),
    val_fraction: float = typer.Option(0.0, "--val-fraction", min=0.0, max=0.99,
                                       help="Fraction of clips held out in OUT/val (seeded)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val split."),
    captions_from_tags: str = typer.Option("none", "--captions-from-tags",
                                           help="none, template (\"The sounds of a, b and c\") or k2c "
                                           "(keyword-to-caption model, also writes text_augment_t5)."),
    k2c_model: Optional[str] = typer.Option(None, "--k2c-model", help="Seq2seq model directory or hub id for k2c "
                                            "(LAION used mrm8488/t5-base-finetuned-common_gen)."),
    k2c_batch_size: int = typer.Option(16, "--k2c-batch-size", min=1, help="Tag lists per K2C generate call."),
    device: str = typer.Option("auto", "--device", help="Device of the K2C model: auto, cpu or cuda."),
    images: Optional[str] = typer.Option(None, "--images", help="Manifest column with one image per clip for "
                                         "Wav2CLIP training: a .jpg/.png frame or a .npy CLIP image embedding."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=0,
                                          help="Decoding processes (default: cores - 1, at most 4)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Decode clips to 48 kHz mono 16-bit FLAC and write them with their captions as tar shards."""
    from ..errors import UsageError
    from ..data.shard_writer import make_shards
    from ..data.shards import CAPTIONS_FROM_TAGS

    if captions_from_tags not in CAPTIONS_FROM_TAGS:
        raise UsageError(f"--captions-from-tags must be one of {', '.join(CAPTIONS_FROM_TAGS)}")
    if workers is None:
        workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    progress = _Progress()
    try:
        report = make_shards(src, out, captions=captions, shard_size=shard_size, val_fraction=val_fraction,
                             seed=seed, captions_from_tags=captions_from_tags, k2c_model=k2c_model,
                             k2c_batch_size=k2c_batch_size, device=device, workers=workers, progress=progress,
                             images=images)
    finally:
        progress.stop()
    summary = report.as_dict()
    if as_json:
        output.json_line(summary)
    else:
        console = output.stderr_console()
        for path, reason in report.skipped:
            console.print(f"[yellow]skipped:[/] {output.literal(path)}: {output.literal(reason)}", highlight=False)
        for name, split in report.splits.items():
            console.print(f"{name}: {split['samples']} clips, {split['hours']:.3f} h in {split['shards']} "
                          f"shard(s) at {output.literal(split['directory'])}", highlight=False)
        if report.captions_from_tags == "k2c":
            console.print(f"keyword-to-caption captions: {report.k2c_captions}", highlight=False)
        console.print(f"skipped: {len(report.skipped)}", highlight=False)
    if summary["samples"] == 0:
        raise typer.Exit(1)


@shards_app.command("info")
def info(
    directory: Path = typer.Argument(..., metavar="DIR", help="A `shards make` output folder or a folder of tars.",
                                     show_default=False),
    examples: int = typer.Option(3, "--examples", min=0, help="Example captions shown per split."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per split."),
) -> None:
    """Counts, audio hours, caption/tag coverage; checks every shard against sizes.json (exit 1 on a mismatch)."""
    from ..errors import DataError
    from ..data.shard_info import inspect_shards

    splits = inspect_shards(directory, examples=examples)
    if as_json:
        for split in splits:
            output.json_line(split.as_dict())
    else:
        _render(splits)
    problems = [p for s in splits for p in s.problems]
    if problems:
        more = f" (and {len(problems) - 1} more problem(s); see above)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)


def _render(splits) -> None:
    from rich.table import Table

    table = Table(title="shards")
    with_images = any(s.with_frame or s.with_embedding for s in splits)
    columns = ["split", "shards", "clips", "hours", "text", "tags", "k2c text"]
    columns += ["frames", "embeddings"] if with_images else []
    for col in columns:
        table.add_column(col)
    for s in splits:
        pct = (lambda n: f"{100 * n / s.samples:.0f}%" if s.samples else "-")
        row = [s.name, str(s.shards), str(s.samples), f"{s.seconds / 3600:.3f}", pct(s.with_text),
               pct(s.with_tag), pct(s.with_t5)]
        if with_images:
            dims = "/".join(map(str, s.embedding_dims))
            row += [pct(s.with_frame), pct(s.with_embedding) + (f" (D={dims})" if dims else "")]
        table.add_row(*row)
    output.stdout_console().print(table)
    console = output.stdout_console()
    for s in splits:
        for caption in s.examples:
            console.print(f"  {s.name}: {output.display_path(caption)}", highlight=False, markup=False)
    err = output.stderr_console()
    for s in splits:
        for problem in s.problems:
            err.print(f"[red]problem:[/] {output.literal(problem)}", highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(shards_app, name="shards")
