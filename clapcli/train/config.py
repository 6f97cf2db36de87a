"""Typed configuration of a training run: every option of `clap train`, every default written once.

A run directory's `config.json` is `TrainConfig.to_dict()` plus the resolved model description, so a run
can be read back and `--resume` can tell whether a directory holds the same run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..tagging.prompts import DEFAULT_TEMPLATE

# Options that may change between a run and its resumption without making it "another run".
RESUMABLE_CHANGES = ("epochs", "save_every", "workers", "device", "resume", "log_every", "val_every_epochs",
                     "log_samples", "max_steps", "dist_timeout")

OBJECTIVES = ("clap", "wav2clip")
TEXT_SOURCES = ("text", "k2c", "all")
RETRIEVAL_KEYS = [f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10", "mean_rank",
                                                                 "median_rank")]
IMAGE_RETRIEVAL_KEYS = [k.replace("t2a", "i2a").replace("a2t", "a2i") for k in RETRIEVAL_KEYS]  # wav2clip
ZEROSHOT_KEYS = [f"zeroshot_{m}" for m in ("top1", "top5", "top10", "mAP@10", "mean_rank")]
BEST_METRICS = ["mAP@10", *RETRIEVAL_KEYS, *IMAGE_RETRIEVAL_KEYS, *ZEROSHOT_KEYS]  # choices of best_metric


@dataclass
class TrainConfig:
    data: str  # shard folder: a `clap shards make` output (its train/ split) or a folder of tars + sizes.json
    out: str  # run directory: config.json, log.jsonl, step-N/, best/, final/, trainer_state.pt
    val: str | None = None  # validation shards (default: the data folder's val/ split when it has one)
    val_zeroshot: str | None = None  # labelled clips (class folders or path,label CSV) for zero-shot accuracy
    labels: str | None = None  # zero-shot candidates: a label set as `clap tag --labels` takes (default: the classes)
    template: str = DEFAULT_TEMPLATE  # zero-shot prompt (LAION-CLAP's)
    init: str | None = None  # start from this model (hub id, HF directory, LAION .pt, clapcli directory)
    model_config: str | None = None  # or build a fresh model from this preset (see `clap models presets`)
    text_model: str | None = None  # with model_config: pretrained transformers text tower (name or directory)
    tokenizer: str | None = None  # with model_config: tokenizer (name or directory); default: text_model's
    audio_init: str | None = None  # with model_config: AudioSet-pretrained audio encoder weights (PANN Cnn14 .pth,
    # a PANN/HTSAT Lightning .ckpt with sed_model. keys, or a LAION-CLAP .pt's audio_branch)
    epochs: int = 1  # passes over the training data
    batch_size: int = 32  # samples per optimizer step and rank (before --accum-steps multiplies it)
    lr: float = 1e-4  # peak learning rate (LAION-CLAP's released recipe)
    warmup: int = 100  # linear warm-up steps, then cosine decay to 0 at the last step
    wd: float = 0.0  # weight decay (never on norms, biases, logit scales)
    beta1: float = 0.9  # Adam β1
    beta2: float = 0.999  # Adam β2
    eps: float = 1e-8  # Adam ε
    grad_clip: float = 0.0  # clip the global gradient norm to this value; 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs CUDA; bf16 is slow on CPUs without native bf16)
    freeze_audio: bool = False  # lock the audio tower (heads and logit scales still train)
    freeze_text: bool = False  # lock the text tower
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    accum_steps: int = 1  # micro-batches per step; the loss is still over the whole batch (feature cache)
    local_loss: bool = False  # distributed: each rank's rows against all columns (the option that scales)
    gather_with_grad: bool = True  # distributed: gather features with gradient (exact global loss)
    text_source: str = "text"  # one of TEXT_SOURCES; caption field: text | k2c (text_augment_t5) | all (text_augment_all)
    objective: str = "clap"  # one of OBJECTIVES; clap: audio–caption contrastive; wav2clip: distil audio towards CLIP image embeddings
    teacher: str | None = None  # wav2clip: CLIP model (directory or hub id) whose vision tower embeds .jpg frames
    spec_augment: bool = False  # random time/frequency masks on the training mel (never at inference)
    save_every: int = 0  # also checkpoint every N steps (0: only at each epoch end and at the end)
    keep_checkpoints: int = 2  # step-N/ folders kept (the newest); best/ and final/ are always kept
    best_metric: str = "mAP@10"  # validation metric choosing best/: mAP@10 (mean of both ways) or any key
    val_every_epochs: int = 1  # validate every N epochs (and always at the end)
    log_every: int = 10  # steps between log lines
    seed: int = 0  # one seed for init, data order, crops and masks
    workers: int = 2  # DataLoader processes decoding audio per rank (0: decode in the training process)
    shuffle_buffer: int = 1000  # samples in the shuffle buffer of each data worker
    device: str = "auto"  # auto | cpu | cuda
    resume: bool = False  # continue the latest checkpoint of `out`
    log_samples: bool = False  # also record every step's sample keys in log.jsonl (to check the data order)
    max_steps: int = 0  # stop after this many steps in total (0: run all epochs); for tests and smoke runs
    dist_timeout: float = 0.0  # seconds a collective of the training step may wait for a rank (0: torch's default)

    def check(self) -> None:
        """Refuse values no run can use, once for the CLI and the library (UsageError naming the option).
        What needs the device (fp16 on a CPU) or the data is checked where those are known."""
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be {' or '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.text_source not in TEXT_SOURCES:
            raise UsageError(f"--text-source must be {', '.join(TEXT_SOURCES[:-1])} or {TEXT_SOURCES[-1]}, got "
                             f"{self.text_source!r}")
        from ..runtime import TRAINING_PRECISIONS  # here: `clap --help` reads this module and must not load torch

        if self.precision not in TRAINING_PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {self.precision!r}")
        if self.teacher and self.objective != "wav2clip":
            raise UsageError("--teacher is for --objective wav2clip")
        if self.best_metric not in BEST_METRICS:
            raise UsageError(f"--best-metric {self.best_metric!r} is not a validation metric; choose one of: "
                             + ", ".join(BEST_METRICS))
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise UsageError(f"--batch-size {self.batch_size} is not a multiple of --accum-steps {self.accum_steps}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def same_run_as(self, other: "TrainConfig") -> list[str]:
        """Fields that differ in a way that makes `other` a different run (empty: the same run)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != theirs.get(k))


@dataclass
class TrainState:
    """What a checkpoint needs beyond the weights to continue exactly."""

    step: int = 0  # optimizer steps done in total
    epoch: int = 0  # current epoch (0-based)
    epoch_step: int = 0  # steps done within the current epoch: the data position
    steps_per_epoch: int = 0  # fixed for the run by the data sizes, world size and batch size
    best_value: float | None = None  # best validation metric so far
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)  # validation results per epoch
    epoch_loss: float = 0.0  # finetune --full: clip-weighted sum of this epoch's step losses so far
