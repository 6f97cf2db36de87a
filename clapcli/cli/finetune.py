"""`clap finetune`: a supervised classifier (a head on the audio embedding, or the whole audio encoder)
from labelled audio, written as a directory `clap tag --classifier` and `load_classifier` read."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import options, output


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)


def finetune_command(
    data: Path = typer.Option(..., "--data", help="Class subfolders of audio, a CSV/JSONL with path and "
                              "label (or labels: a JSON list or 'a;b' for --multi-label), or shards whose "
                              "samples carry `tag` lists."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation data, same layouts (default: a fixed, "
                                       "seeded, stratified 20% of --data)."),
    model: Optional[str] = options.MODEL,
    head: str = typer.Option("linear", "--head", help="linear or mlp."),
    full: bool = typer.Option(False, "--full", help="Train the audio encoder too (the text tower stays fixed)."),
    multi_label: bool = typer.Option(False, "--multi-label", help="Several labels per clip: BCE, mAP and mAUC."),
    epochs: int = typer.Option(30, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=2, help="Clips per optimiser step."),
    lr: float = typer.Option(1e-3, "--lr", help="Learning rate of the head (AdamW)."),
    encoder_lr: float = typer.Option(1e-5, "--encoder-lr", help="Learning rate of the audio encoder with --full."),
    mixup: float = typer.Option(0.0, "--mixup", min=0.0, help="Mixup alpha (0: off)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Classifier directory to write "
                                       "(default: ./<data name>-classifier)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the classifier already in --out."),
    seed: int = typer.Option(0, "--seed", help="Seeds the split, the head's init and the batch order."),
    device: str = options.DEVICE,
    precision: str = typer.Option("fp32", "--precision", help="With --full: fp32, bf16 or fp16 (fp16 needs CUDA)."),
    warmup: int = typer.Option(0, "--warmup", min=0, help="With --full: linear warm-up steps, then cosine decay "
                               "of both learning rates."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="With --full: the run's log.jsonl and step "
                                           "checkpoints (default: <out>.run beside --out)."),
    resume: bool = typer.Option(False, "--resume", help="With --full: continue the run in --run-dir from its "
                                "latest checkpoint."),
    save_every: int = typer.Option(0, "--save-every", min=0, help="With --full: also checkpoint every N steps "
                                   "(0: at each epoch end)."),
    keep_checkpoints: int = typer.Option(2, "--keep-checkpoints", min=1, help="With --full: step checkpoints kept."),
    max_steps: int = typer.Option(0, "--max-steps", min=0, help="With --full: stop after N steps in total (0: "
                                  "all epochs)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per epoch, then a summary object."),
) -> None:
    """Train a classifier on labelled audio: a head on cached embeddings in seconds, or --full."""
    out = out if out is not None else Path.cwd() / f"{data.expanduser().resolve().name or 'data'}-classifier"
    from ..train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(data=str(data), val=None if val is None else str(val), model=model, head=head, full=full,
                         multi_label=multi_label, epochs=epochs, batch_size=batch_size, lr=lr,
                         encoder_lr=encoder_lr, mixup=mixup, seed=seed, device=device, precision=precision,
                         warmup=warmup, run_dir=None if run_dir is None else str(run_dir), resume=resume,
                         save_every=save_every, keep_checkpoints=keep_checkpoints, max_steps=max_steps)
    err = output.stderr_console()
    key = "val_mAP" if multi_label else "val_top1"

    def on_epoch(record: dict) -> None:
        if as_json:
            output.json_line({k: v for k, v in record.items() if k != "val_confusions"})
        else:
            value = record.get(key)
            shown = "n/a" if value is None else f"{value:.3f}"
            err.print(f"epoch {record['epoch']:>3}  loss {record['train_loss']:.4f}  {key[4:]} {shown}",
                      highlight=False)

    classifier = finetune(cfg, out, on_epoch=on_epoch, overwrite=overwrite)
    from ..dist import detect

    if not detect().is_main:  # under torchrun, rank 0 reports
        return
    metrics = classifier.metrics
    summary = {"classifier": str(classifier.directory), "labels": classifier.labels,
               "multi_label": classifier.multi_label, "best_epoch": metrics["best_epoch"],
               **{k: v for k, v in metrics["best"].items() if k.startswith("val_")},
               "train_clips": metrics["train_clips"], "val_clips": metrics["val_clips"]}
    if as_json:
        output.json_line(summary)
        return
    best = {k: v for k, v in summary.items() if k.startswith("val_") and k != "val_confusions"}
    shown = "  ".join(f"{k[4:]} {'n/a' if v is None else f'{v:.3f}'}" for k, v in best.items())
    print(f"best epoch {summary['best_epoch']}: {shown}")
    for c in summary.get("val_confusions") or []:
        print(f"  confused: {c['target']} -> {c['predicted']} ({c['count']})")
    print(f"wrote {summary['classifier']} ({len(classifier.labels)} labels, {summary['train_clips']} training "
          f"clips, {summary['val_clips']} validation clips)")
