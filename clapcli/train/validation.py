"""Validation during training: retrieval both ways on held-out shards, embedded as at inference.

Audio goes through the same deterministic path as `clap index` (fusion crops at fixed positions, full
coverage windows for unfused models), so a validation number means what a user will see. Every caption of
a sample counts (the several-captions protocol, see `metrics.retrieval_metrics`).

The functions here measure; they neither change the module's mode nor save anything. The loop puts the
module in eval mode, builds the `embedder` around it, validates, puts it back in training mode and keeps
best/ (`loop._validate`).
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.labelled import LabelledClip
from ..data.shards import ShardSplit, decode_audio, iter_shard, select_text
from ..errors import DataError
from ..eval.metrics import retrieval_metrics, zeroshot_metrics
from ..tagging.prompts import DEFAULT_TEMPLATE, render
from .stream import sample_image



def embedder(model, tokenizer, device: torch.device | None = None):
    """An inference `Clap` around a model being trained, at fp32 on the torch engine. The model must already
    be in eval mode (`Clap` asks for it): the caller owns the mode and restores training mode after."""
    from ..engine.clap import Clap
    from ..models.weights import LoadedCheckpoint

    device = device or next(model.parameters()).device
    # torch engine: the weights change every step, and an exported copy would go stale
    return Clap(LoadedCheckpoint(model, tokenizer, "training", "", "training", "training"), device, "fp32", "torch")


def validate(clap, split: ShardSplit, batch_size: int = 16) -> dict:
    """Audio↔caption retrieval of `split` through `clap` (an `embedder`): `t2a_R@1`, ..., `a2t_mAP@10`."""
    sr, quantize = clap.config.frontend.sample_rate, clap.config.frontend.quantize_int16
    audio, captions, owner = [], [], []
    waves: list[np.ndarray] = []

    def flush():
        if waves:
            audio.extend(e.embedding for e in clap.embed_waveforms(waves, segments=False, batch_size=batch_size))
            waves.clear()

    for url in split.urls:
        for raw in iter_shard(url):
            texts = select_text(raw.meta, "text", key=f"{raw.url}: {raw.key}")
            captions.extend(texts)
            owner.extend([len(audio) + len(waves)] * len(texts))
            waves.append(decode_audio(raw, sr, quantize))
            if len(waves) >= batch_size:
                flush()
    flush()
    text = clap.embed_text(captions)
    metrics = retrieval_metrics(np.stack(audio), text, np.asarray(owner))
    metrics["samples"] = len(audio)
    metrics["captions"] = len(captions)
    return metrics


def validate_images(clap, split: ShardSplit, teacher=None, batch_size: int = 16) -> dict:
    """Wav2CLIP validation: audio↔image retrieval between each clip's embedding (as `clap index` embeds it)
    and its own image's CLIP embedding (the `.npy` as stored, a `.jpg` frame through `teacher`); keys
    `a2i_R@1`, `a2i_mAP@10`, ... and the same `i2a_` (image → audio)."""
    sr, quantize = clap.config.frontend.sample_rate, clap.config.frontend.quantize_int16
    dim = clap.config.projection_dim
    audio: list[np.ndarray] = []
    images: list[np.ndarray | None] = []  # (D,) each; None until the teacher has embedded the frame
    waves: list[np.ndarray] = []
    frames: list[tuple[int, object]] = []  # (row, decoded frame) waiting for the teacher

    def flush():
        if waves:
            audio.extend(e.embedding for e in clap.embed_waveforms(waves, segments=False, batch_size=batch_size))
            waves.clear()
        if frames:
            embedded = teacher.embed_frames([f for _, f in frames], batch_size=batch_size).cpu().numpy()  # (P, D)
            for (row, _), vector in zip(frames, embedded):
                images[row] = vector
            frames.clear()

    for url in split.urls:
        for raw in iter_shard(url):
            image = sample_image(raw, dim, teacher is not None)
            if raw.image_ext == "npy":
                images.append(image)
            else:
                frames.append((len(images), image))
                images.append(None)
            waves.append(decode_audio(raw, sr, quantize))
            if len(waves) >= batch_size:
                flush()
    flush()
    image = torch.nn.functional.normalize(torch.from_numpy(np.stack(images)).float(), dim=-1)  # (N, D)
    metrics = retrieval_metrics(np.stack(audio), image, np.arange(len(images)))
    metrics = {k.replace("t2a_", "i2a_").replace("a2t_", "a2i_"): v for k, v in metrics.items()}
    metrics["samples"] = len(audio)
    return metrics


def validate_zeroshot(clap, clips: list[LabelledClip], labels: list[str],
                      template: str = DEFAULT_TEMPLATE, batch_size: int = 16) -> dict:
    """Zero-shot classification of labelled clips against `labels`, each put into `template`."""
    index = {label: i for i, label in enumerate(labels)}
    audio = []
    for e in clap.embed_files([c.path for c in clips], batch_size=batch_size, segments=False):
        if e.error:
            raise DataError(e.error, source=str(e.path))
        audio.append(e.embedding)
    text = clap.embed_text(render([template], labels))
    result = zeroshot_metrics(np.stack(audio), text, np.asarray([index[c.label] for c in clips]))
    return {f"zeroshot_{k}": v for k, v in result.items() if isinstance(v, float)}
