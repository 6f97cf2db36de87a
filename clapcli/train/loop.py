"""The contrastive training loop: `train(cfg, ctx)` on one screen, `train_step` apart so tests can call it.

One process per device; under `torchrun` every rank runs this same code on its own share of the data
(`data.py`), features are gathered across ranks inside the loss (`loss.py`), DDP averages the gradients,
and only rank 0 logs, validates and saves.

`--objective wav2clip` runs the same loop on image batches: the model and the objective's own parameters
(image head, logit scales) train as one module (`objective.Wav2ClipTrainee`), frames are embedded by the
frozen teacher (`teacher.py`) before each step, and validation is audio↔image retrieval.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

from .. import dist
from ..atomic import atomic_write
from ..errors import DataError, TrainingError, UsageError
from ..runtime import TRAINING_PRECISIONS, autocast, native_bf16, resolve_precision
from .batch import Collate, FrameBatch, ImageCollate
from .state import prune_step_checkpoints, resume_state, save_checkpoint
from .config import TrainConfig, TrainState
from .stream import ShardStream, loader, steps_per_epoch
from .loss import ClipLoss, clamp_logit_scale_
from .objective import Wav2ClipLoss, Wav2ClipObjective, Wav2ClipTrainee, check_widths
from .runlock import RunLock
from .runlog import RunLog
from .prepare import build_model, open_data, open_zeroshot, prepare_run_dir, with_default_model
from .validation import embedder, validate, validate_images, validate_zeroshot

Logger = Callable[[dict], None]


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up to `base` over `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return base * (step + 1) / warmup
    span = max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / span))) * base


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on weight matrices only (= Adam when wd is 0, the LAION recipe)."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.wd}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def train_step(model, batch, loss_fn, optimizer, *, accum_steps: int = 1, grad_clip: float = 0.0,
               scaler=None, precision: str = "fp32", device: torch.device = torch.device("cpu")) -> float:
    """One optimizer step on `batch`; returns the loss.

    `model(*batch)` gives the features (a NamedTuple: (B, …) rows and () logit scales): a `ClapModel` on a
    `Batch` with a `ClipLoss`, a `Wav2ClipTrainee` on an `ImageBatch` with a `Wav2ClipLoss`, or
    `finetune.ClassifierTrainee` on a `ClipBatch` with a `ClassificationLoss`. A loss other than `ClipLoss`
    takes the model's output as it is.

    With accum_steps K > 1 the batch runs as K micro-batches and the gradient is still that of the loss
    over the whole batch: features of every micro-batch are first computed without gradient, then each
    micro-batch is run again with gradient and its features swapped into the cached set (the feature-cache
    method). The logit scales' gradient is taken from the first micro-batch only, so it is counted once.
    (BatchNorm layers in training mode see micro-batch statistics and update their running averages on both
    passes; with a locked audio tower the result equals the whole-batch step exactly, see the tests.)
    """
    module = getattr(model, "module", model)
    loss_of = _clap_loss(loss_fn) if isinstance(loss_fn, ClipLoss) else loss_fn
    optimizer.zero_grad(set_to_none=True)
    if accum_steps <= 1:
        with autocast(device, precision):
            loss = loss_of(model(*batch))
        _backward(loss, scaler)
        value = float(loss.detach())
    else:
        micro = [type(batch)(*parts) for parts in zip(*(t.chunk(accum_steps) for t in batch))]
        with torch.no_grad(), autocast(device, precision):
            cached = [[f.float() for f in model(*m)] for m in micro]
        value = 0.0
        for j, m in enumerate(micro):
            last = j == len(micro) - 1
            # DDP: gradients are averaged across ranks once, after the last micro-batch's backward
            with (model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()), \
                    autocast(device, precision):
                out = model(*m)
                merged = type(out)(*(_with_cached(f.float(), [c[i] for c in cached], j) for i, f in enumerate(out)))
                loss = loss_of(merged)
                _backward(loss, scaler)
            value = float(loss.detach())
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    with torch.no_grad():
        if hasattr(module, "clamp_logit_scales_"):
            module.clamp_logit_scales_()
        elif hasattr(module, "logit_scale_a"):  # a classifier has no logit scale
            clamp_logit_scale_(module.logit_scale_a)
    return value


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch's generator for one step (dropout, crops, mixup): every random draw of a step is a function
    of (seed, step, rank), so a resumed run repeats a straight one without saved RNG state."""
    torch.manual_seed(seed * 1_000_003 + step * 9_973 + rank)


def _clap_loss(loss_fn: ClipLoss):
    return lambda out: loss_fn(out.audio_embeds.float(), out.text_embeds.float(), out.logit_scale_a.float())


def _with_cached(live: torch.Tensor, cached: list[torch.Tensor], j: int) -> torch.Tensor:
    """Micro-batch j's live features among the cached ones of the others; a logit scale counts in micro-batch 0."""
    if live.ndim == 0:
        return live if j == 0 else live.detach()
    return torch.cat(cached[:j] + [live] + cached[j + 1 :])


def _backward(loss: torch.Tensor, scaler) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(f"the loss became {float(loss)}: lower --lr, use --precision fp32, or raise --warmup")
    (scaler.scale(loss) if scaler is not None else loss).backward()


def train(cfg: TrainConfig, ctx: dist.DistContext | None = None, display: Logger | None = None) -> dict:
    """Run (or resume) the training described by `cfg`; returns a summary dict.

    Rank 0 records every event in RUN/log.jsonl and passes it to `display`."""
    cfg.check()
    cfg = with_default_model(cfg)
    ctx = ctx or dist.init(cfg.device, timeout=timedelta(seconds=cfg.dist_timeout) if cfg.dist_timeout else None)
    device = ctx.device
    precision = resolve_precision(cfg.precision, device, allowed=TRAINING_PRECISIONS)
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device; use fp32 (or bf16 where the CPU runs it natively)")
    run_dir = Path(cfg.out)
    with RunLock(run_dir, enabled=ctx.is_main):  # one run writes RUN_DIR at a time, for its whole life
        resume_from = prepare_run_dir(run_dir, cfg, ctx) if ctx.is_main else None
        resume_from = dist.broadcast_object(str(resume_from) if resume_from else None, main_work=True)
        log = RunLog(run_dir, display, enabled=ctx.is_main)
        try:
            return _run(cfg, ctx, device, precision, run_dir, resume_from, log)
        finally:
            log.close()


def _run(cfg, ctx, device, precision, run_dir, resume_from, log) -> dict:
    if precision == "bf16" and device.type == "cpu" and not native_bf16(device):
        log({"warning": "bf16 on this CPU (no native bf16) is several times slower than fp32"})
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_info = build_model(cfg, resume_from)
    for note in model_info.get("notes", []):
        log({"warning": note})
    wav2clip = cfg.objective == "wav2clip"
    if model.config.text_tower is not None and not wav2clip:
        raise UsageError("a Wav2CLIP model has no text tower of its own to train against captions; distil it "
                         "with --objective wav2clip --teacher CLIP_DIR")
    teacher, (dim, width) = _distillation_setup(cfg, model, device) if wav2clip else (None, (None, None))
    model.to(device)
    if cfg.freeze_audio:
        model.lock_audio_tower()
    if cfg.freeze_text:
        model.lock_text_tower()
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    trainee = Wav2ClipTrainee(model, Wav2ClipObjective(dim, width)).to(device) if wav2clip else model
    trainee.train()
    split, val_split = open_data(cfg)
    zeroshot = open_zeroshot(cfg)
    steps = steps_per_epoch(split, cfg.batch_size, ctx.world_size, cfg.workers, cfg.seed)
    total = steps * cfg.epochs  # the schedule's length; --max-steps only stops early
    planned = min(total, cfg.max_steps) if cfg.max_steps else total
    optimizer = make_optimizer(trainee, cfg)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    state = TrainState(steps_per_epoch=steps)
    if resume_from:
        state, saved = resume_state(resume_from, steps, run_dir, "same data, --batch-size and number of ranks")
        optimizer.load_state_dict(saved["optimizer"])
        if wav2clip:
            if not saved.get("objective"):
                raise TrainingError(f"cannot resume {resume_from}: it holds no wav2clip objective state")
            trainee.objective.load_state_dict(saved["objective"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        log({"event": "resumed", "from": str(resume_from), "step": state.step, "epoch": state.epoch})
    if ctx.is_main:  # replaced whole or not at all: a resume reads it to check its options
        atomic_write(run_dir / "config.json", json.dumps({"train": cfg.to_dict(), "model": model_info,
                                                          "world_size": ctx.world_size}, indent=2) + "\n")
    ddp = trainee
    if ctx.distributed:
        ddp = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    loss_kind = Wav2ClipLoss if wav2clip else ClipLoss
    loss_fn = loss_kind(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=ctx.rank,
                        world_size=ctx.world_size)
    collate = (ImageCollate(model.config.frontend, model.config.fused, dim, teacher and teacher.preprocess,
                            cfg.spec_augment) if wav2clip else
               Collate(model.config.frontend, model.config.fused, tokenizer, model.config.text.max_length,
                       cfg.spec_augment))
    objective = trainee.objective if wav2clip else None
    save = checkpoint_saver(cfg, run_dir, model, tokenizer, optimizer, scaler, state, model_info, ctx, objective)

    def validate_and_keep_best() -> None:
        """Rank 0 validates in eval mode (the others wait), then training mode again; best/ by cfg.best_metric."""
        if ctx.is_main:
            trainee.eval()
            try:
                metrics = _validate(cfg, model, tokenizer, val_split, zeroshot, teacher)
            finally:
                trainee.train()
            state.history.append({"step": state.step, "epoch": state.epoch, **metrics})
            log({"step": state.step, "epoch": state.epoch, "val": metrics})
            value = _metric(metrics, cfg.best_metric)
            if value is not None and (state.best_value is None or value > state.best_value):
                state.best_value, state.best_step = value, state.step
                save("best", {"best_metric": cfg.best_metric, "value": value})
        dist.barrier(main_work=True)

    log({"event": "start", "steps_per_epoch": steps, "total_steps": planned, "samples": split.num_samples,
         "world_size": ctx.world_size, "device": str(device), "precision": precision})

    t_last, n_last = time.perf_counter(), 0
    while state.epoch < cfg.epochs and not _stop(cfg, state):
        stream = ShardStream(split, collate, batch_size=cfg.batch_size, epoch=state.epoch, seed=cfg.seed,
                             rank=ctx.rank, world_size=ctx.world_size, workers=cfg.workers, steps=steps,
                             skip=state.epoch_step, text_source=cfg.text_source, shuffle_buffer=cfg.shuffle_buffer,
                             sample_rate=model.config.frontend.sample_rate,
                             quantize=model.config.frontend.quantize_int16)
        for item in loader(stream, cfg.workers, pin_memory=device.type == "cuda"):
            if isinstance(item, DataError):
                raise item
            keys, batch = item
            batch = batch.to(device)
            if isinstance(batch, FrameBatch):
                batch = batch.resolve(teacher.embed if teacher else None)
            lr = lr_at(state.step, cfg.lr, cfg.warmup, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            seed_step(cfg.seed, state.step, ctx.rank)  # dropout: a function of the step
            try:
                loss = train_step(ddp, batch, loss_fn, optimizer, accum_steps=cfg.accum_steps,
                                  grad_clip=cfg.grad_clip, scaler=scaler, precision=precision, device=device)
            except torch.OutOfMemoryError as exc:
                raise TrainingError(f"out of memory at batch size {cfg.batch_size}: lower --batch-size, or add "
                                    "--accum-steps K (same loss, K smaller passes) or --grad-checkpointing") from exc
            state.step += 1
            state.epoch_step += 1
            n_last += len(batch) * ctx.world_size
            if ctx.is_main and (state.step % cfg.log_every == 0 or state.epoch_step == steps or cfg.log_samples):
                now = time.perf_counter()
                scales = (trainee.logit_scales() if wav2clip else
                          {"logit_scale": round(float(model.logit_scale_a.detach().exp()), 4)})
                record = {"step": state.step, "epoch": state.epoch, "loss": round(loss, 6), "lr": lr, **scales,
                          "samples_per_s": round(n_last / max(now - t_last, 1e-9), 2), "total_steps": planned}
                log({**record, "keys": keys} if cfg.log_samples else record)
                t_last, n_last = now, 0
            if state.epoch_step == steps:
                state.epoch, state.epoch_step = state.epoch + 1, 0
                if (val_split or zeroshot) and (state.epoch % cfg.val_every_epochs == 0 or state.epoch == cfg.epochs):
                    validate_and_keep_best()
                save(f"step-{state.step}")
            elif cfg.save_every and state.step % cfg.save_every == 0:
                save(f"step-{state.step}")
            if _stop(cfg, state):
                break
    if state.epoch_step and (val_split or zeroshot):  # stopped by --max-steps inside an epoch: validate the end too
        validate_and_keep_best()
    save("final")
    dist.barrier()
    summary = {"event": "done", "steps": state.step, "epochs": state.epoch, "out": str(run_dir),
               "best": state.best_value, "best_step": state.best_step}
    log(summary)
    return summary


def _distillation_setup(cfg: TrainConfig, model, device):
    """wav2clip: (the teacher or None, (D, W)); a Wav2CLIP model's text side becomes the teacher's CLIP text
    tower (its `text_tower` reference, loaded only when text is embedded), so the saved model searches."""
    from .teacher import ImageTeacher

    teacher = ImageTeacher(cfg.teacher, device) if cfg.teacher else None
    widths = check_widths(model, teacher.dim if teacher else None)
    if cfg.teacher and model.config.text_tower is not None:
        model.config.text_tower = cfg.teacher
    return teacher, widths


def _stop(cfg: TrainConfig, state: TrainState) -> bool:
    return bool(cfg.max_steps) and state.step >= cfg.max_steps


def checkpoint_saver(cfg, run_dir, model, tokenizer, optimizer, scaler, state, model_info, ctx, objective=None):
    """save(name): RUN/name/ written by rank 0 while the other ranks wait (`cfg.keep_checkpoints` step-N/
    folders kept). step-N/ and final/ hold what resuming needs; save("best", {metric, value}) holds the model
    and state without the optimizer, and is called on rank 0 alone, inside validation (whose barrier the other
    ranks are waiting at). `objective` is saved in the trainer state: wav2clip's, or finetune's head."""

    def save(name: str, extra: dict | None = None) -> None:
        best = name == "best"
        if ctx.is_main:
            about = {"training_run": str(run_dir.resolve()), "step": state.step}
            about = {**about, **extra} if best else {"source": model_info.get("source"), **about}
            save_checkpoint(run_dir, name, model, tokenizer, None if best else optimizer, None if best else scaler,
                            state, about, objective=objective)
            if not best:
                prune_step_checkpoints(run_dir, cfg.keep_checkpoints)
        if not best:
            dist.barrier(main_work=True)

    return save


def _validate(cfg, model, tokenizer, val_split, zeroshot, teacher=None) -> dict:
    """Metrics of `model` (in eval mode) on the validation shards (audio↔caption retrieval; audio↔image for
    wav2clip, `teacher` embedding .jpg frames) and on the zero-shot clips."""
    clap = embedder(model, tokenizer)
    metrics = {}
    if val_split is not None:
        metrics = (validate_images(clap, val_split, teacher) if cfg.objective == "wav2clip"
                   else validate(clap, val_split))
    if zeroshot is not None:
        metrics.update(validate_zeroshot(clap, *zeroshot, template=cfg.template))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def _metric(metrics: dict, name: str) -> float | None:
    """The value `name` ranks checkpoints by, larger = better (ranks are negated); None if not measured.
    mAP@10 is the mean of both directions (LAION's selection; audio↔image for wav2clip); without retrieval
    data, zero-shot top-1."""
    if name == "mAP@10":
        for one, other in (("t2a", "a2t"), ("i2a", "a2i")):
            if f"{one}_mAP@10" in metrics:
                return (metrics[f"{one}_mAP@10"] + metrics[f"{other}_mAP@10"]) / 2
        name = "zeroshot_top1"
    value = metrics.get(name)
    if value is None:
        return None
    return -float(value) if name.endswith("rank") else float(value)
