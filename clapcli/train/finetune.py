"""Supervised finetuning: a classifier head on CLAP audio embeddings, frozen encoder or full.

Frozen encoder (the default): every clip's raw audio embedding (the projection output before L2
normalisation, what LAION's linear probe reads) is computed once through the same deterministic path as
`clap index` and cached on disk, keyed by (model fingerprint, file content hash); the head then trains on
those vectors in seconds and a second run does no audio forward pass at all.

`full=True`: the audio encoder and its projection train with the head, at their own lower learning rate;
the text tower is locked and never changes. BatchNorm statistics stay as loaded (the encoder runs in eval
mode), so small batches behave. This runs on `clap train`'s machinery: its step function (`loop.train_step`,
autocast and the fp16 loss scaler), its schedule (`loop.lr_at`: warm-up, then cosine decay), DDP under
`torchrun` (each rank takes its share of every batch), the run lock, log.jsonl and step checkpoints in a run
directory (`<out>.run` beside the classifier, the head saved as the objective's state) that `resume`
continues exactly. The best epoch's encoder (the run's best/) is saved inside the classifier directory.

Single-label data trains with cross-entropy and reports top-1 / top-5 accuracy and the most confused
pairs; multi-label data with BCE and reports mAP and mAUC. Mixup (`mixup > 0`) blends pairs of inputs and
their targets with a Beta(α, α) weight.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import is_fill_temp
from ..errors import DataError, TrainingError, UsageError
from ..eval.metrics import multilabel_map, multilabel_mauc
from ..models.classifier import (HEAD_KINDS, META_FILE, MODEL_DIR, Classifier, HeadConfig, build_head,
                                 head_probabilities)
from .classifier_data import Dataset, cached_embeddings, label_names, read_data, stratified_split, to_dataset

MAX_CONFUSIONS = 10


@dataclass
class FinetuneConfig:
    data: str  # class folders, or a path,label / path,labels CSV or JSONL
    val: str | None = None  # the same for validation; None: a seeded stratified split of `data`
    model: str | None = None  # base model (hub id, directory, .pt); None: the default model
    head: str = "linear"  # "linear" or "mlp"
    full: bool = False  # train the audio encoder too
    multi_label: bool = False  # BCE on several labels per clip (needs `labels` in the manifest)
    epochs: int = 30
    batch_size: int = 32  # clips per optimiser step
    lr: float = 1e-3  # the head's learning rate (AdamW)
    encoder_lr: float = 1e-5  # the audio encoder's learning rate with `full`
    weight_decay: float = 0.0  # AdamW weight decay on the head
    mixup: float = 0.0  # Beta(α, α) mixup of inputs and targets; 0: off
    val_fraction: float = 0.2  # share of each class held out when there is no `val`
    seed: int = 0
    device: str = "auto"
    embed_batch_size: int = 8  # clips per forward pass when embedding
    # with `full` only: the training machinery of `clap train`
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 needs CUDA), the encoder's and head's matrix work
    warmup: int = 0  # linear warm-up steps, then cosine decay of both learning rates to 0 at the last step
    run_dir: str | None = None  # log.jsonl, config.json, step-N/, best/; None: `<out>.run` beside the classifier
    resume: bool = False  # continue the latest checkpoint of the run directory
    save_every: int = 0  # also checkpoint every N steps (0: at each epoch end and at the end)
    keep_checkpoints: int = 2  # step-N/ folders kept (the newest); best/ is always kept
    max_steps: int = 0  # stop after this many steps in total (0: run all epochs)


# Options that may change between a --full run and its resumption without making it another run.
RESUMABLE_CHANGES = ("epochs", "device", "embed_batch_size", "run_dir", "resume", "save_every", "keep_checkpoints",
                     "max_steps")
FULL_ONLY = {"precision": "--precision", "warmup": "--warmup", "run_dir": "--run-dir", "resume": "--resume",
             "save_every": "--save-every", "keep_checkpoints": "--keep-checkpoints", "max_steps": "--max-steps"}


def classification_metrics(probs: np.ndarray, targets: np.ndarray, labels: list[str], multi_label: bool) -> dict:
    """Single-label: top1, top5 and the most confused (target, predicted) pairs; multi-label: mAP, mAUC."""
    if multi_label:
        out = {}
        try:
            out["mAP"] = multilabel_map(probs, targets)
        except ValueError:
            out["mAP"] = None  # no label has a positive clip in this split
        try:
            out["mAUC"] = multilabel_mauc(probs, targets)
        except ValueError:
            out["mAUC"] = None
        return out
    order = np.argsort(-probs, axis=1, kind="stable")  # (N, L)
    k5 = min(5, probs.shape[1])
    hit = order == targets[:, None]
    predicted = order[:, 0]
    wrong = predicted != targets
    pairs = Counter(zip(targets[wrong].tolist(), predicted[wrong].tolist()))
    confusions = [{"target": labels[t], "predicted": labels[p], "count": n}
                  for (t, p), n in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CONFUSIONS]]
    return {"top1": float(hit[:, 0].mean()), "top5": float(hit[:, :k5].any(axis=1).mean()),
            "confusions": confusions}


def main_metric(multi_label: bool) -> str:
    return "mAP" if multi_label else "top1"


# ---- training -----------------------------------------------------------------------------------------
def _loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """Cross-entropy (targets: indices, or soft distributions after mixup) or BCE (0/1 or mixed)."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def _head_step(head, optimizer, x, y, cfg, n_labels: int, gen) -> float:
    """One optimizer step on (x, y), mixup first when asked; returns the batch loss. With --full the
    optimizer also holds the encoder, whose graph `x` carries."""
    x, y = _mix(x, y, cfg.mixup, n_labels, cfg.multi_label, gen)
    loss = _loss(head(x), y, cfg.multi_label)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def _mix(x: torch.Tensor, y: torch.Tensor, alpha: float, n_labels: int, multi_label: bool,
         gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup of a batch with a permutation of itself; single-label targets become soft (B, L)."""
    if not multi_label:
        y = F.one_hot(y, n_labels).float()
    if alpha <= 0 or x.shape[0] < 2:
        return x, y
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], generator=gen, device="cpu").to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def _batches(n: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=gen)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:  # no lone clip in a batch
        batches[-2] = torch.cat([batches[-2], batches.pop()])
    return batches


def check_output(out: str | Path, overwrite: bool = False) -> bool:
    """Refuse, before any training, an `out` the classifier cannot be written to; True when `out` is an
    existing empty directory, which is then filled in place (a mount point cannot be renamed over).

    An existing classifier is replaced only with `overwrite`, and not when it is a mount point (its
    replacement could not be one rename); any other non-empty path is refused."""
    out = Path(out).expanduser()
    if not out.exists() and not out.is_symlink():
        return False
    if out.is_dir() and all(is_fill_temp(p.name) for p in out.iterdir()):
        return True
    if not (out / META_FILE).is_file():
        raise UsageError(f"{out} exists and is not a classifier directory; choose another --out")
    if not overwrite:
        raise UsageError(f"{out} already holds a classifier; pass --overwrite to replace it, or choose another --out")
    if os.path.ismount(out):
        raise UsageError(f"{out} is a mount point holding a classifier, which cannot be replaced in one step; "
                         "empty it first, or choose a folder inside it as --out")
    return False


def finetune(cfg: FinetuneConfig, out: str | Path, on_epoch: Callable[[dict], None] | None = None,
             on_embed: Callable[[int], None] | None = None, model=None, overwrite: bool = False) -> Classifier:
    """Train a classifier as `cfg` says and write its directory to `out` (atomically); returns the Classifier.

    An existing classifier at `out` is replaced only with `overwrite` (see `check_output`, run before any
    training); with `cfg.full`, `overwrite` also lets a fresh run replace the one in the run directory.
    `model` (a loaded `Clap`) replaces loading `cfg.model`; with `cfg.full` its weights are trained in place.
    `on_epoch(record)` gets each epoch's metrics, `on_embed(n)` counts clips embedded or read from the cache.
    Under `torchrun` (with `cfg.full`) every rank trains and rank 0 writes `out`."""
    from .. import dist
    from ..engine.load import load_model
    from ..atomic import atomic_directory, fill_directory
    from ..models.classifier import read_classifier, save_classifier

    fill_in_place = check_output(out, overwrite)
    if cfg.head not in HEAD_KINDS:
        raise UsageError(f"unknown head {cfg.head!r}; choose one of: {', '.join(HEAD_KINDS)}")
    if cfg.epochs < 1 or cfg.batch_size < 2 or cfg.lr <= 0 or cfg.encoder_lr <= 0 or cfg.mixup < 0:
        raise UsageError("--epochs ≥ 1, --batch-size ≥ 2, --lr > 0, --encoder-lr > 0 and --mixup ≥ 0")
    defaults = FinetuneConfig(cfg.data)
    given = [flag for name, flag in FULL_ONLY.items() if getattr(cfg, name) != getattr(defaults, name)]
    if given and not cfg.full:
        raise UsageError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for --full training")
    if cfg.full:
        _check_full(cfg)
    clips = read_data(cfg.data, cfg.multi_label)
    if cfg.val is not None:
        train_clips, val_clips = clips, read_data(cfg.val, cfg.multi_label)
    else:
        train_clips, val_clips = stratified_split(clips, cfg.val_fraction, cfg.seed)
    labels = label_names(train_clips)
    if len(labels) < 2:
        raise DataError(f"need at least 2 classes to train a classifier, found {len(labels)}: {', '.join(labels)}")
    train_set = to_dataset(train_clips, labels, cfg.multi_label, "the training data")
    val_set = to_dataset(val_clips, labels, cfg.multi_label, "the validation data")

    torch.manual_seed(cfg.seed)
    ctx = dist.init(cfg.device) if cfg.full else None
    device = str(ctx.device) if ctx is not None else cfg.device
    clap = model if model is not None else load_model(cfg.model, device=device, precision="fp32", engine="torch")
    base_identity, base_fingerprint = clap.identity_dict, clap.fingerprint
    head_cfg = HeadConfig(cfg.head, clap.dim, len(labels))
    head = build_head(head_cfg).to(clap.device)
    if cfg.full and clap.model.audio_runner is not None:  # an exported (onnx) audio encoder would go stale
        clap.model.audio_runner, clap.engine = None, "torch"
    out = Path(out).expanduser()
    if cfg.full:
        run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else out.with_name(out.name + ".run")
        history, best = _train_full(cfg, clap, head, train_set, val_set, labels, on_epoch, on_embed, ctx,
                                    run_dir, overwrite)
        if not ctx.is_main:
            dist.barrier(main_work=True)  # rank 0 writes the classifier
            return read_classifier(out)
    else:
        history, best = _train_frozen(cfg, clap, head, train_set, val_set, labels, on_epoch, on_embed)

    metrics = {"best_epoch": best["epoch"], "best": {k: v for k, v in best.items() if k != "epoch"},
               "history": history, "train_clips": len(train_set.paths), "val_clips": len(val_set.paths)}
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with (fill_directory(out, last=(META_FILE,)) if fill_in_place else atomic_directory(out)) as tmp:
        encoder, encoder_fp = base_identity, base_fingerprint
        if cfg.full:
            clap.save(tmp / MODEL_DIR)
            encoder, encoder_fp = _saved_encoder(tmp / MODEL_DIR)
        save_classifier(tmp, head.cpu(), head_cfg, labels, cfg.multi_label, encoder, encoder_fp,
                        base_identity, metrics, options)
    if cfg.full:
        dist.barrier(main_work=True)
    classifier = read_classifier(out)
    if not cfg.full:
        classifier.model = clap
    return classifier


def _check_full(cfg: FinetuneConfig) -> None:
    """Refuse --full options no run can use, before any data is read (UsageError naming the option)."""
    from ..runtime import TRAINING_PRECISIONS

    if cfg.precision not in TRAINING_PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(TRAINING_PRECISIONS)}, got {cfg.precision!r}")
    if cfg.warmup < 0 or cfg.save_every < 0 or cfg.max_steps < 0 or cfg.keep_checkpoints < 1:
        raise UsageError("--warmup, --save-every and --max-steps ≥ 0, --keep-checkpoints ≥ 1")


def _saved_encoder(model_dir: Path) -> tuple[dict, str]:
    """The identity dict (load reference: the classifier's `model/`) and fingerprint a Clap loaded from the
    saved finetuned model will have; the weights hash is the loader's, read from the files just written."""
    from ..identity import fingerprint, model_identity
    from ..models.checkpoints import load_checkpoint

    loaded = load_checkpoint(model_dir)
    cfg = loaded.model.config
    identity = model_identity(MODEL_DIR, loaded.fingerprint, cfg.frontend.settings(), cfg.fused, cfg.projection_dim)
    return identity, fingerprint(identity)


def _epoch_record(epoch: int, loss: float, logits: torch.Tensor, val: Dataset, labels: list[str],
                  multi_label: bool, started: float) -> dict:
    """One epoch's line: training loss, validation loss and metrics, seconds taken."""
    targets = torch.as_tensor(val.targets, device=logits.device)
    val_loss = float(_loss(logits, targets, multi_label))
    probs = head_probabilities(logits, multi_label).cpu().numpy()
    metrics = classification_metrics(probs, val.targets, labels, multi_label)
    return {"epoch": epoch, "train_loss": round(loss, 6), "val_loss": round(val_loss, 6),
            **{f"val_{k}": v for k, v in metrics.items()}, "seconds": round(time.monotonic() - started, 3)}


def _is_better(record: dict, best: dict | None, multi_label: bool) -> bool:
    """Best epoch: the highest validation top-1 (mAP for multi-label); on a tie, the lower validation loss
    (a small validation set often ties at 1.0 long before the head has converged)."""
    key = f"val_{main_metric(multi_label)}"
    if best is None:
        return True
    value, current = record.get(key), best.get(key)
    if value is None:
        return False
    if current is None or value != current:
        return current is None or value > current
    return record["val_loss"] < best["val_loss"]


def _train_frozen(cfg, clap, head, train: Dataset, val: Dataset, labels, on_epoch, on_embed):
    x_train = torch.as_tensor(cached_embeddings(clap, train.paths, cfg.embed_batch_size, on_embed), device=clap.device)
    x_val = torch.as_tensor(cached_embeddings(clap, val.paths, cfg.embed_batch_size, on_embed), device=clap.device)
    head[0].fit(x_train)
    y_train = torch.as_tensor(train.targets, device=clap.device)
    gen = torch.Generator().manual_seed(cfg.seed)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history, best, best_state = [], None, None
    for epoch in range(1, cfg.epochs + 1):
        started = time.monotonic()
        head.train()
        total, count = 0.0, 0
        for idx in _batches(len(train.paths), cfg.batch_size, gen):
            idx = idx.to(clap.device)
            loss = _head_step(head, optimizer, x_train[idx], y_train[idx], cfg, len(labels), gen)
            total, count = total + loss * len(idx), count + len(idx)
        head.eval()
        with torch.no_grad():
            record = _epoch_record(epoch, total / count, head(x_val), val, labels, cfg.multi_label, started)
        history.append(record)
        if _is_better(record, best, cfg.multi_label):
            best, best_state = record, copy.deepcopy(head.state_dict())
        if on_epoch:
            on_epoch(record)
    head.load_state_dict(best_state)
    return history, best


class ClipBatch(NamedTuple):
    """One rank's share of a --full step: what `ClassifierTrainee` takes (tensors, so `train_step` can split it)."""

    features: torch.Tensor  # (B, C, frames, n_bins) front-end features
    longer: torch.Tensor  # (B,) bool: the clip is longer than one window (fusion)
    targets: torch.Tensor  # (B,) class indices, or (B, L) 0/1 for multi-label


class ClassifierOutput(NamedTuple):
    logits: torch.Tensor  # (B, L)
    targets: torch.Tensor  # (B, L) soft targets (one-hot, or mixed by mixup)


class ClassifierTrainee(torch.nn.Module):
    """The audio encoder and the head as one module, the unit DDP wraps and `train_step` steps: features →
    raw embedding → (mixup) → logits. Mixup draws from torch's generator, which the loop seeds per step."""

    def __init__(self, model, head, mixup: float, n_labels: int, multi_label: bool):
        super().__init__()
        self.model, self.head = model, head
        self.mixup, self.n_labels, self.multi_label = mixup, n_labels, multi_label

    def forward(self, features, longer, targets) -> ClassifierOutput:
        emb = self.model.encode_audio(features, longer, normalize=False)  # (B, D) raw
        emb, targets = _mix(emb, targets, self.mixup, self.n_labels, self.multi_label, None)
        return ClassifierOutput(self.head(emb), targets)


class ClassificationLoss:
    """CE on soft targets (single-label) or BCE (multi-label), in fp32 whatever the autocast precision."""

    def __init__(self, multi_label: bool):
        self.multi_label = multi_label

    def __call__(self, out: ClassifierOutput) -> torch.Tensor:
        return _loss(out.logits.float(), out.targets.float(), self.multi_label)


def _train_full(cfg, clap, head, train: Dataset, val: Dataset, labels, on_epoch, on_embed, ctx, run_dir: Path,
                overwrite: bool):
    """Train encoder and head in `run_dir` (holding its lock); returns (history, best record) with the best
    validation's weights loaded into `clap.model` and `head` on rank 0."""
    from .. import dist
    from .runlock import RunLock
    from .runlog import RunLog

    with RunLock(run_dir, enabled=ctx.is_main):
        resume_from = _prepare_run_dir(run_dir, cfg, overwrite) if ctx.is_main else None
        resume_from = dist.broadcast_object(str(resume_from) if resume_from else None, main_work=True)
        log = RunLog(run_dir, enabled=ctx.is_main)
        try:
            return _run_full(cfg, clap, head, train, val, labels, on_epoch, on_embed, ctx, run_dir, resume_from, log)
        finally:
            log.close()


def _prepare_run_dir(run_dir: Path, cfg: FinetuneConfig, overwrite: bool) -> Path | None:
    """The checkpoint to resume from, or None to start fresh in an empty `run_dir`. A run directory holding
    a run is continued with `resume` (the same options but RESUMABLE_CHANGES), started again with
    `overwrite`, else refused."""
    from .runlock import LOCK_FILES
    from .state import clear_stale, latest_checkpoint

    config_file = run_dir / "config.json"
    if config_file.is_file():
        if cfg.resume:
            try:
                previous = json.loads(config_file.read_text())["finetune"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{config_file} is not a clap finetune run ({exc}); choose another --run-dir") from exc
            mine = _run_options(cfg)
            changed = sorted(k for k in mine if k not in RESUMABLE_CHANGES and mine[k] != previous.get(k))
            if changed:
                raise UsageError(f"{run_dir} holds a different finetune run (differs in: {', '.join(changed)}); "
                                 "resume it with the same options, or pass --overwrite without --resume")
            clear_stale(run_dir)
            return latest_checkpoint(run_dir)
        if not overwrite:
            raise UsageError(f"{run_dir} holds a finetune run; pass --resume to continue it, --overwrite to start "
                             "again, or choose another --run-dir")
    elif run_dir.exists() and any(p.name not in LOCK_FILES for p in run_dir.iterdir()):
        raise UsageError(f"{run_dir} exists and is not a clap finetune run; choose another --run-dir")
    for p in run_dir.iterdir():
        if p.name not in LOCK_FILES:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return None


def _run_options(cfg: FinetuneConfig) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}


def _run_full(cfg, clap, head, train, val, labels, on_epoch, on_embed, ctx, run_dir, resume_from, log):
    from .. import dist
    from ..atomic import atomic_write
    from ..audio.decode import load_audio
    from ..models.checkpoints import load_checkpoint
    from ..runtime import TRAINING_PRECISIONS, resolve_precision
    from .config import TrainState
    from .loop import checkpoint_saver, lr_at, seed_step, train_step
    from .state import load_trainer_state, resume_state

    device = clap.device
    precision = resolve_precision(cfg.precision, device, allowed=TRAINING_PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use fp32 (or bf16 where the CPU runs it natively)")
    if cfg.batch_size < 2 * ctx.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} gives {ctx.world_size} ranks less than 2 clips each")
    model = clap.model
    model.lock_text_tower()
    model.eval()  # BatchNorm statistics and dropout as loaded; gradients still flow
    fe = clap.config.frontend

    def decode(path: Path) -> np.ndarray:
        try:
            return load_audio(path, fe.sample_rate, fe.quantize_int16)
        except Exception as exc:  # noqa: BLE001 - any decode failure is this file's problem
            raise DataError(f"cannot read audio: {exc}", source=str(path)) from exc

    waves = [decode(p) for p in train.paths]  # decoded once, kept in memory for every epoch
    val_waves = [decode(p) for p in val.paths] if ctx.is_main else []
    encoder_params = [p for n, p in model.named_parameters()
                      if n.startswith(("audio_model.", "audio_projection.")) and p.requires_grad]
    base_lrs = (cfg.encoder_lr, cfg.lr)
    optimizer = torch.optim.AdamW([{"params": encoder_params, "lr": cfg.encoder_lr, "weight_decay": 0.0},
                                   {"params": head.parameters(), "lr": cfg.lr, "weight_decay": cfg.weight_decay}])
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    steps = len(_batches(len(waves), cfg.batch_size, torch.Generator()))
    total = steps * cfg.epochs  # the schedule's length; max_steps only stops early
    state = TrainState(steps_per_epoch=steps)
    if resume_from:
        state, saved = resume_state(resume_from, steps, run_dir, "same data and --batch-size")
        model.load_state_dict(load_checkpoint(resume_from).model.state_dict())
        head.load_state_dict(saved["objective"])
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        log({"event": "resumed", "from": str(resume_from), "step": state.step, "epoch": state.epoch})
    else:  # the standardisation is fitted once, on the starting encoder's embeddings of the training clips
        head[0].fit(torch.as_tensor(cached_embeddings(clap, train.paths, cfg.embed_batch_size, on_embed),
                                    device=device))
    if ctx.is_main:
        atomic_write(run_dir / "config.json", json.dumps({"finetune": _run_options(cfg), "labels": labels,
                                                          "world_size": ctx.world_size}, indent=2) + "\n")
    trainee = ClassifierTrainee(model, head, cfg.mixup, len(labels), cfg.multi_label)
    ddp = trainee
    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    loss_fn = ClassificationLoss(cfg.multi_label)
    y_train = torch.as_tensor(train.targets, device=device)
    info = {"source": str(cfg.model) if cfg.model else clap.loaded.name}
    save = checkpoint_saver(cfg, run_dir, model, clap.tokenizer, optimizer, scaler, state, info, ctx, head)
    history = state.history

    def validate_and_keep_best(epoch: int, train_loss: float, started: float) -> None:
        """Rank 0 measures the head on the validation clips (the others wait) and keeps best/."""
        if ctx.is_main:
            head.eval()
            emb_val = np.stack([e.embedding for e in clap.embed_waveforms(val_waves, segments=False,
                                                                           batch_size=cfg.embed_batch_size,
                                                                           normalize=False)])
            with torch.no_grad():
                logits = head(torch.as_tensor(emb_val, device=device))  # (V, L)
                record = _epoch_record(epoch, train_loss, logits, val, labels, cfg.multi_label, started)
            head.train()
            best = next((r for r in history if r["step"] == state.best_step), None)
            history.append({**record, "step": state.step})
            log({"step": state.step, **record})
            if _is_better(record, best, cfg.multi_label):
                state.best_value, state.best_step = record.get(f"val_{main_metric(cfg.multi_label)}"), state.step
                save("best", {"best_metric": main_metric(cfg.multi_label), "value": state.best_value})
            if on_epoch:
                on_epoch(record)
        dist.barrier(main_work=True)

    log({"event": "start", "steps_per_epoch": steps, "total_steps": min(total, cfg.max_steps or total),
         "clips": len(waves), "world_size": ctx.world_size, "device": str(device), "precision": precision})
    head.train()
    started, saved_at = time.monotonic(), None
    while state.epoch < cfg.epochs and not (cfg.max_steps and state.step >= cfg.max_steps):
        batches = _epoch_batches(len(waves), cfg, state.epoch)
        for idx in batches[state.epoch_step:]:
            share = idx[ctx.rank :: ctx.world_size].tolist()  # this rank's clips of the step
            seed_step(cfg.seed, state.step, ctx.rank)  # crops and mixup: a function of the step
            feats, longer = clap.features.clip_features([waves[i] for i in share])  # (b, C, frames, n_bins)
            lr = [lr_at(state.step, base, cfg.warmup, total) for base in base_lrs]
            for group, group_lr in zip(optimizer.param_groups, lr):
                group["lr"] = group_lr
            try:
                loss = train_step(ddp, ClipBatch(feats, longer, y_train[share]), loss_fn, optimizer, scaler=scaler,
                                  precision=precision, device=device)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(f"out of memory at batch size {cfg.batch_size}: lower --batch-size") from exc
            loss = float(dist.all_reduce_mean(torch.tensor(loss, device=device)))
            state.step += 1
            state.epoch_step += 1
            state.epoch_loss += loss * len(idx)
            log({"step": state.step, "epoch": state.epoch, "loss": round(loss, 6), "encoder_lr": lr[0], "lr": lr[1],
                 "total_steps": total})
            if state.epoch_step == steps:
                train_loss = state.epoch_loss / len(waves)
                state.epoch, state.epoch_step, state.epoch_loss = state.epoch + 1, 0, 0.0
                validate_and_keep_best(state.epoch, train_loss, started)
                started = time.monotonic()
                save(f"step-{state.step}")
                saved_at = state.step
            elif cfg.save_every and state.step % cfg.save_every == 0:
                save(f"step-{state.step}")
                saved_at = state.step
            if cfg.max_steps and state.step >= cfg.max_steps:
                break
    if state.epoch_step:  # stopped by max_steps inside an epoch: validate and keep that point too
        clips = sum(len(b) for b in _epoch_batches(len(waves), cfg, state.epoch)[: state.epoch_step])
        validate_and_keep_best(state.epoch + 1, state.epoch_loss / clips, started)
    if saved_at != state.step:
        save(f"step-{state.step}")
    log({"event": "done", "steps": state.step, "epochs": state.epoch, "best_step": state.best_step})
    if not ctx.is_main:
        return history, None
    best_dir = run_dir / "best"
    model.load_state_dict(load_checkpoint(best_dir).model.state_dict())
    head.load_state_dict(load_trainer_state(best_dir)["objective"])
    best = next(r for r in history if r["step"] == state.best_step)
    return [_without_step(r) for r in history], _without_step(best)


def _epoch_batches(n: int, cfg: FinetuneConfig, epoch: int) -> list[torch.Tensor]:
    """The clip order of one --full epoch, a function of (seed, epoch) so a resumed run finds its place."""
    return _batches(n, cfg.batch_size, torch.Generator().manual_seed(cfg.seed * 7_919 + epoch))


def _without_step(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step"}


# ---- evaluation ---------------------------------------------------------------------------------------
def evaluate_classifier(classifier_dir: str | Path, data: str | Path, model=None, device: str = "auto",
                        batch_size: int = 8) -> dict:
    """Metrics of a saved classifier on labelled data (class folders or a manifest), as `finetune` reports
    them: top1/top5/confusions, or mAP/mAUC for a multi-label head; plus `clips` and `labels`.

    Embeddings come through the classifier's own model (and the on-disk cache); classes the classifier
    does not know are a DataError."""
    from ..engine.load import load_classifier

    classifier = load_classifier(classifier_dir, model=model, device=device)
    clips = read_data(data, classifier.multi_label)
    dataset = to_dataset(clips, classifier.labels, classifier.multi_label, str(data))
    emb = cached_embeddings(classifier.model, dataset.paths, batch_size)
    probs = classifier.probabilities(emb)
    metrics = classification_metrics(probs, dataset.targets, classifier.labels, classifier.multi_label)
    metrics.update({"clips": len(dataset.paths), "labels": len(classifier.labels),
                    "multi_label": classifier.multi_label})
    return metrics
