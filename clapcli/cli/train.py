"""`clap train`: contrastive training from webdataset shards, on one CPU, one GPU, or many under torchrun."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from ..tagging.prompts import DEFAULT_TEMPLATE
from . import output


def train_command(
    data: Path = typer.Option(..., "--data", help="Shards: a `clap shards make` folder (its train/ split) or a "
                              "folder of .tar shards with sizes.json."),
    val: Optional[Path] = typer.Option(None, "--val", help="Validation shards (default: DATA/val when present)."),
    val_zeroshot: Optional[Path] = typer.Option(None, "--val-zeroshot", help="Also validate zero-shot "
                                                "accuracy on labelled clips (class subfolders, or a path,label "
                                                "CSV/JSONL)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Zero-shot candidates: a label set, @FILE or "
                                         "a comma list (default: the classes of --val-zeroshot)."),
    template: str = typer.Option(DEFAULT_TEMPLATE, "--template", help="Zero-shot prompt; {} is the label."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this model: hub id, HF directory, LAION "
                                       ".pt or clapcli directory (domain adaptation)."),
    model_config: Optional[str] = typer.Option(None, "--model-config", help="Or a fresh model from a preset "
                                               "(`clap models presets`; `tiny` for CPU experiments)."),
    text_model: Optional[str] = typer.Option(None, "--text-model", help="With --model-config: a pretrained "
                                             "transformers text tower (name or directory): RoBERTa, BERT, CLIP "
                                             "(its text half + projection) or any encoder."),
    audio_init: Optional[Path] = typer.Option(None, "--audio-init", help="With --model-config: start the audio "
                                              "encoder from AudioSet-pretrained weights (PANN Cnn14*.pth, a "
                                              "sed_model. Lightning .ckpt, or a LAION .pt's audio branch)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer name or directory (a fresh "
                                            "model's vocabulary follows it; fully offline with a directory)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default: ./runs/clap-<time>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the latest checkpoint of --out exactly."),
    epochs: int = typer.Option(1, "--epochs", min=1),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=2, help="Samples per step on each rank."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate."),
    warmup: int = typer.Option(100, "--warmup", min=0, help="Linear warm-up steps, then cosine decay."),
    wd: float = typer.Option(0.0, "--wd", min=0.0, help="Weight decay (never on norms, biases, logit scales)."),
    grad_clip: float = typer.Option(0.0, "--grad-clip", min=0.0, help="Clip the gradient norm (0: off)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (CUDA)."),
    freeze_audio: bool = typer.Option(False, "--freeze-audio", help="Keep the audio tower fixed."),
    freeze_text: bool = typer.Option(False, "--freeze-text", help="Keep the text tower fixed."),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Less memory, more compute."),
    accum_steps: int = typer.Option(1, "--accum-steps", min=1, help="Run each batch as K smaller passes "
                                    "(the loss stays that of the whole batch)."),
    local_loss: bool = typer.Option(False, "--local-loss", help="Distributed: each rank's rows against all "
                                    "columns (scales to many GPUs)."),
    gather_with_grad: bool = typer.Option(True, "--gather-with-grad/--no-gather-with-grad",
                                          help="Distributed: gather features with gradient (exact loss)."),
    text_source: str = typer.Option("text", "--text-source", help="Captions: text, k2c (text_augment_t5) or "
                                    "all (text_augment_all)."),
    spec_augment: bool = typer.Option(False, "--spec-augment", help="Random time/frequency masks in training."),
    objective: str = typer.Option("clap", "--objective", help="clap (audio–caption) or wav2clip (distil the "
                                  "audio encoder towards the CLIP image embeddings of the shards' images)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="wav2clip: CLIP model directory or hub id; its "
                                          "vision tower embeds .jpg frames, its text tower becomes the model's."),
    save_every: int = typer.Option(0, "--save-every", min=0, help="Also checkpoint every N steps."),
    keep: int = typer.Option(2, "--keep", min=1, help="step-N/ checkpoints kept (best/ and final/ always)."),
    best_metric: str = typer.Option("mAP@10", "--best-metric", help="Validation metric choosing best/."),
    seed: int = typer.Option(0, "--seed"),
    workers: int = typer.Option(2, "--workers", min=0, help="Data worker processes per rank."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda (torchrun: one GPU per rank)."),
    dist_timeout: float = typer.Option(0.0, "--dist-timeout", min=0.0, help="Seconds a training step's "
                                       "collective waits for a slow rank (0: torch's default, 10 min on NCCL); "
                                       "waits for rank 0's validation and saving have 24 h."),
    max_steps: int = typer.Option(0, "--max-steps", min=0, help="Stop after N steps in total (0: all epochs)."),
    log_every: int = typer.Option(10, "--log-every", min=1, help="Steps between log lines."),
    log_samples: bool = typer.Option(False, "--log-samples", hidden=True, help="Record each step's sample keys."),
    as_json: bool = typer.Option(False, "--json", help="Every log record as a JSON line on stdout."),
) -> None:
    """Train (or adapt) a CLAP model contrastively on audio–caption shards.

    Launch on several GPUs or machines with `torchrun --nproc-per-node N -m clapcli train …`."""
    from ..errors import UsageError
    from ..runtime import TRAINING_PRECISIONS

    if objective not in ("clap", "wav2clip"):
        raise UsageError(f"--objective must be clap or wav2clip, got {objective!r}")
    if text_source not in ("text", "k2c", "all"):
        raise UsageError(f"--text-source must be text, k2c or all, got {text_source!r}")
    if precision not in TRAINING_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {precision!r}")
    if batch_size % accum_steps:
        raise UsageError(f"--batch-size {batch_size} is not a multiple of --accum-steps {accum_steps}")
    if out is None:
        if resume:
            raise UsageError("--resume needs --out RUN_DIR (the run to continue)")
        out = Path("runs") / time.strftime("clap-%Y%m%d-%H%M%S")
    from ..train.config import TrainConfig
    from ..train.loop import train

    cfg = TrainConfig(
        data=str(data), out=str(out), val=str(val) if val else None,
        val_zeroshot=str(val_zeroshot) if val_zeroshot else None, labels=labels, template=template, init=init, model_config=model_config,
        text_model=text_model, tokenizer=tokenizer, audio_init=str(audio_init) if audio_init else None,
        epochs=epochs, batch_size=batch_size, lr=lr, warmup=warmup,
        wd=wd, grad_clip=grad_clip, precision=precision, freeze_audio=freeze_audio, freeze_text=freeze_text,
        grad_checkpointing=grad_checkpointing, accum_steps=accum_steps, local_loss=local_loss,
        gather_with_grad=gather_with_grad, text_source=text_source, spec_augment=spec_augment,
        save_every=save_every, keep_checkpoints=keep, best_metric=best_metric, seed=seed, workers=workers,
        device=device, resume=resume, max_steps=max_steps, log_every=log_every, log_samples=log_samples,
        objective=objective, teacher=teacher, dist_timeout=dist_timeout,
    )
    with _Display(as_json) as display:
        train(cfg, display=display)


class _Display:
    """Progress for people (a rich bar on a terminal, plain lines otherwise) or JSON lines for scripts."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.bar = None
        self.task = None

    def __enter__(self) -> "_Display":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, record: dict) -> None:
        if self.as_json:
            output.json_line({k: v for k, v in record.items() if k != "keys"})
            return
        if "warning" in record:
            output.stderr_console().print(f"[yellow]warning:[/] {output.literal(record['warning'])}", highlight=False)
        elif record.get("event") == "start":
            self._start(record)
        elif "val" in record:
            self._line("validation " + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in record["val"].items()) + f" (step {record['step']})")
        elif "loss" in record:
            self._progress(record)
        elif record.get("event") == "done":
            best = f", best {record['best']:.4f} at step {record['best_step']}" if record.get("best") is not None else ""
            self._line(f"done: {record['steps']} steps, {record['epochs']} epoch(s){best}; model in "
                       f"{record['out']}/final")
        elif record.get("event") == "resumed":
            self._line(f"resumed from {record['from']} at step {record['step']}")

    def _start(self, record: dict) -> None:
        self._line(f"training: {record['samples']} samples, {record['steps_per_epoch']} steps per epoch, "
                   f"{record['total_steps']} steps, {record['world_size']} rank(s) on {record['device']} "
                   f"({record['precision']})")
        if sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                console=output.stderr_console(), transient=True)
            self.task = self.bar.add_task("train", total=record["total_steps"], info="")
            self.bar.start()

    def _progress(self, record: dict) -> None:
        info = (f"epoch {record['epoch']} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                f"{record['samples_per_s']:.1f} samples/s")
        if self.bar is not None:
            self.bar.update(self.task, completed=record["step"], info=info)
        else:
            print(f"step {record['step']}/{record['total_steps']} {info}", file=sys.stderr, flush=True)

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=sys.stderr, flush=True)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
