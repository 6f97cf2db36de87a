"""Loading: `load_model` (a checkpoint → a `Clap`) and `load_classifier` (a `clap finetune` head with its model).

`clapcli.load_model` and `clapcli.load_classifier`, the public façade, call these."""

from __future__ import annotations

import os

from ..models.checkpoints import load_checkpoint
from ..models.classifier import Classifier, read_classifier
from ..models.registry import default_model
from ..runtime import resolve_device, resolve_precision
from .clap import Clap


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    tokenizer: str | None = None,
    text_only: bool = False,
    engine: str | None = None,
) -> Clap:
    """Load a model: a hub id (default `laion/clap-htsat-fused`), a local directory, or an original .pt.

    precision: auto (fp32 on every device: the faithful rule of `clapcli.runtime`), fp32, bf16 (faster where
    native, not exact, batch-dependent) or int8 (CPU: dynamic int8 Linear layers, within cosine 0.995 of
    fp32). text_only: read and build only the text tower and projection (the audio weights never read) where
    the checkpoint allows it (a Hugging Face or clapcli directory with a text tower of its own); elsewhere the
    whole model loads. A text search without torch runs the saved query graph instead
    (`clapcli.models.onnx_text`).
    engine: None ($CLAP_ENGINE if set, else auto), auto (onnx for int8 where it can run: CPU, an HTSAT encoder,
    onnxruntime installed; else torch), torch, or onnx (the audio encoder in onnxruntime, fp32 or int8; see
    `clapcli.models.onnx_audio`)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    ref = name_or_path or default_model()
    return Clap(load_checkpoint(ref, tokenizer=tokenizer, text_only=text_only), dev, prec, engine)


def load_classifier(directory: str | os.PathLike, model: Clap | None = None, device: str = "auto",
                    precision: str = "auto", engine: str | None = None) -> Classifier:
    """Load a classifier written by `clap finetune` (see `clapcli.models.classifier`) with its model: `model` if
    given (refused unless it is the one the head was trained on), else the model the classifier names (its
    base model, or the finetuned `model/` it saved)."""
    classifier = read_classifier(directory)
    if model is None:
        model = load_model(classifier.model_ref, device=device, precision=precision, engine=engine)
    classifier.check_model(model)
    classifier.model = model
    return classifier
