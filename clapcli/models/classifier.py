"""A trained classifier head on CLAP audio embeddings, and the directory `clap finetune` writes it to.

    my-classifier/
      classifier.json     labels, multi-label flag, head shape, the encoder it expects (identity dict with
                          its `model` load reference, and fingerprint), the base model, metrics, options
      head.safetensors    the head's weights
      model/              only after `--full`: the finetuned model in the project's own format

The head reads the RAW audio projection output (`encode_audio(..., normalize=False)`, what LAION's linear
probe uses), so it is fed `embed_files(..., normalize=False)`. Its probabilities are a softmax over labels
(single-label) or an independent sigmoid per label (multi-label). A `Classifier` is a tagging `Scorer`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ClapError, UsageError
from ..records import Scores

FORMAT = "clapcli-classifier"
FORMAT_VERSION = 1
META_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
MODEL_DIR = "model"  # the finetuned model of a `--full` run, inside the classifier directory
HEAD_KINDS = ("linear", "mlp")
# Widths a head file may declare, checked before anything is allocated: released models embed in 512–2048
# dimensions and label sets have hundreds to thousands of labels, so larger sizes are a damaged or hostile file.
MAX_HEAD_WIDTH = 1 << 16  # `dim` and `hidden`
MAX_LABELS = 1 << 20  # `n_labels`
# Bytes of the JSON header at the start of a .safetensors file (the safetensors library's own limit).
MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class HeadConfig:
    kind: str  # "linear" (one Linear) or "mlp" (Linear → ReLU → Dropout → Linear)
    dim: int  # input width: the model's projection dim (512 for released models)
    n_labels: int  # output width
    hidden: int = 512  # mlp only: hidden width
    dropout: float = 0.1  # mlp only: dropout after the ReLU (off at inference)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "n_labels": self.n_labels, "hidden": self.hidden,
                "dropout": self.dropout}


class Standardize(nn.Module):
    """x → (x − mean) / std per feature, with the training set's statistics kept as buffers (saved with the
    head): raw projection outputs have a model-dependent scale, and the head's learning rate should not."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the statistics from (N, dim) training embeddings."""
        self.mean.copy_(x.mean(dim=0))
        self.std.copy_(x.std(dim=0, unbiased=False).clamp_min(1e-6) if x.shape[0] > 1 else torch.ones_like(self.std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def build_head(cfg: HeadConfig) -> nn.Module:
    """(B, dim) raw audio embeddings → (B, n_labels) logits; layer 0 is the `Standardize` step."""
    if cfg.kind == "linear":
        return nn.Sequential(Standardize(cfg.dim), nn.Linear(cfg.dim, cfg.n_labels))
    if cfg.kind == "mlp":
        return nn.Sequential(Standardize(cfg.dim), nn.Linear(cfg.dim, cfg.hidden), nn.ReLU(),
                             nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.n_labels))
    raise UsageError(f"unknown head {cfg.kind!r}; choose one of: {', '.join(HEAD_KINDS)}")


def head_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """(N, L) logits → probabilities: sigmoid per label for multi-label heads, else softmax over labels."""
    return torch.sigmoid(logits) if multi_label else torch.softmax(logits, dim=-1)


@dataclass
class Classifier:
    """A loaded head plus what it was trained on; `model` is the Clap that feeds it (None if not loaded)."""

    directory: Path
    labels: list[str]
    multi_label: bool
    head_config: HeadConfig
    head: nn.Module
    encoder: dict  # identity dict of the model whose raw embeddings the head reads ("model": load reference)
    encoder_fingerprint: str
    base: dict  # identity dict of the model finetuning started from (== encoder unless --full)
    metrics: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    model: object | None = None  # clapcli.engine.clap.Clap, set by clapcli.engine.load.load_classifier
    raw_embeddings: bool = True  # tells tag_files to embed with normalize=False

    @property
    def model_ref(self) -> str:
        """How to load the encoder: the base model's reference, or the finetuned `model/` directory."""
        ref = self.encoder.get("model", "")
        local = self.directory / ref
        return str(local) if ref and not os.path.isabs(ref) and local.exists() else ref

    @torch.inference_mode()
    def probabilities(self, raw_embeddings: np.ndarray) -> np.ndarray:
        """(N, D) raw projection outputs → (N, L) probabilities."""
        x = torch.as_tensor(np.asarray(raw_embeddings, dtype=np.float32))
        if x.ndim == 1:
            x = x[None, :]  # (1, D)
        if x.shape[1] != self.head_config.dim:
            raise ValueError(f"the head takes {self.head_config.dim}-d embeddings, got {tuple(x.shape)}")
        return head_probabilities(self.head(x), self.multi_label).numpy()

    def __call__(self, audio_emb: np.ndarray):
        """The tagging `Scorer` protocol: probabilities from the head, no cosine."""
        return Scores(probs=self.probabilities(audio_emb), cosine=None)

    def embed(self, paths, batch_size: int = 8) -> np.ndarray:
        """Raw embeddings (N, D) of audio files through the classifier's model; ClapError on a bad file."""
        if self.model is None:
            raise ClapError("this classifier was read without its model; use load_classifier")
        out = []
        for e in self.model.embed_files(paths, batch_size=batch_size, segments=False, normalize=False):
            if e.error is not None:
                raise ClapError(f"{e.path}: {e.error}")
            out.append(e.embedding)
        return np.stack(out) if out else np.zeros((0, self.head_config.dim), np.float32)

    def classify_files(self, paths, batch_size: int = 8) -> np.ndarray:
        """(N, L) probabilities of audio files."""
        return self.probabilities(self.embed(paths, batch_size))

    def check_model(self, model) -> None:
        """Refuse a model whose embeddings are not the ones this head was trained on."""
        if model.fingerprint != self.encoder_fingerprint:
            raise UsageError(
                f"classifier {self.directory} was trained on model {self.encoder.get('model')!r} "
                f"(fingerprint {self.encoder_fingerprint}), not on {model.model_ref!r} (fingerprint "
                f"{model.fingerprint}); drop --model to use the classifier's own model"
            )


def save_classifier(directory: Path, head: nn.Module, head_config: HeadConfig, labels: list[str],
                    multi_label: bool, encoder: dict, encoder_fingerprint: str, base: dict,
                    metrics: dict, options: dict) -> None:
    """Write classifier.json and head.safetensors into `directory` (which must exist)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(directory / HEAD_FILE), metadata={"format": FORMAT})
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "labels": list(labels), "multi_label": multi_label,
        "head": head_config.to_dict(), "encoder": encoder, "encoder_fingerprint": encoder_fingerprint,
        "base": base, "metrics": metrics, "options": options,
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")


def read_classifier(directory: str | os.PathLike) -> Classifier:
    """The head and its metadata, without loading a model."""
    from safetensors.torch import load_file

    directory = Path(directory).expanduser()
    meta_path = directory / META_FILE
    if not meta_path.is_file() or not (directory / HEAD_FILE).is_file():
        raise UsageError(f"{directory} is not a classifier directory (no {META_FILE} / {HEAD_FILE}); "
                         "make one with `clap finetune`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ClapError(f"{meta_path}: not JSON ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise ClapError(f"{meta_path}: not a clapcli classifier")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ClapError(f"{directory} was written by a newer clapcli; upgrade clapcli to load it")
    cfg = _head_config(meta_path, meta)
    _check_head_file(directory / HEAD_FILE, cfg)  # sizes and shapes, before a tensor is allocated
    head = build_head(cfg)
    head.load_state_dict(load_file(str(directory / HEAD_FILE)), strict=True)
    head.eval()
    return Classifier(directory.resolve(), list(meta["labels"]), bool(meta["multi_label"]), cfg, head,
                      meta["encoder"], meta["encoder_fingerprint"], meta.get("base", meta["encoder"]),
                      meta.get("metrics", {}), meta.get("options", {}))


def _head_config(meta_path: Path, meta: dict) -> HeadConfig:
    """The head's config from classifier.json, its sizes checked against MAX_HEAD_WIDTH / MAX_LABELS and the
    labels; ClapError naming the file otherwise."""
    head, labels = meta.get("head"), meta.get("labels")
    fields = set(HeadConfig.__dataclass_fields__)
    if not isinstance(head, dict) or not {"kind", "dim", "n_labels"} <= head.keys() <= fields:
        raise ClapError(f"{meta_path}: 'head' must be an object with {', '.join(sorted(fields))}")
    if head["kind"] not in HEAD_KINDS:
        raise ClapError(f"{meta_path}: unknown head {head['kind']!r}; known: {', '.join(HEAD_KINDS)}")
    for name, limit in (("dim", MAX_HEAD_WIDTH), ("hidden", MAX_HEAD_WIDTH), ("n_labels", MAX_LABELS)):
        value = head.get(name, 1)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise ClapError(f"{meta_path}: head {name} {value!r} is not a width from 1 to {limit}")
    if not isinstance(labels, list) or len(labels) != head["n_labels"]:
        count = len(labels) if isinstance(labels, list) else "no"
        raise ClapError(f"{meta_path}: the head has {head['n_labels']} outputs but the file lists {count} labels")
    return HeadConfig(**head)


def _check_head_file(path: Path, cfg: HeadConfig) -> None:
    """Read the .safetensors header alone and check that it holds exactly the tensors `cfg` describes (names,
    float32, shapes) within the file's size; ClapError naming the file otherwise."""
    with torch.device("meta"):  # shapes without storage
        expected = {k: tuple(v.shape) for k, v in build_head(cfg).state_dict().items()}
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or not 2 <= n <= min(size - 8, MAX_SAFETENSORS_HEADER):
                raise ValueError(f"its header declares {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ClapError(f"{path}: not a safetensors file ({exc})") from exc
    header.pop("__metadata__", None)
    if header.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - header.keys()), sorted(header.keys() - expected.keys())
        raise ClapError(f"{path}: does not hold the head classifier.json describes (missing: "
                        f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})")
    for name, shape in expected.items():
        entry = header[name] if isinstance(header[name], dict) else {}
        stored, offsets = entry.get("shape"), entry.get("data_offsets")
        if stored != list(shape) or entry.get("dtype") != "F32":
            raise ClapError(f"{path}: tensor {name} is {entry.get('dtype')} {stored}, classifier.json implies "
                            f"F32 {list(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or offsets[1] - offsets[0] != 4 * math.prod(shape) or offsets[0] < 0 or 8 + n + offsets[1] > size):
            raise ClapError(f"{path}: tensor {name} lies outside the file ({size} bytes): truncated or damaged")
