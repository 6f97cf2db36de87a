"""On-disk cache of ensembled label text embeddings, so a label set is encoded once per model.

Key: (model fingerprint, label set content hash, templates). The fingerprint (`clapcli.identity`) covers
the weights, front end and dim, not where the model was loaded from, so a model moved or copied to
another directory still hits its entries. Files, under `label_cache_dir()`: `<sha256 of the key>.npy`
(the (L, D) float32 label embeddings) and `<sha256>.json` (the key itself plus a little context, for
people looking at the directory). Both are written with `clapcli.atomic.atomic_write`, the array first,
so a reader sees either a complete entry or a miss; a corrupt or mismatching entry is a miss and is
rewritten.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..atomic import atomic_write, write_npy
from ..home import cache_dir as clap_cache_dir
from .labels import LabelSet
from .prompts import check_templates, render
from .scoring import label_embeddings

CACHE_FORMAT = 2  # bump when the stored embeddings or the key change meaning; old entries then simply miss


class TextEmbedder(Protocol):
    fingerprint: str  # the model fingerprint: weights, front end and dim, not the load path

    def embed_text(self, texts: list[str]) -> np.ndarray: ...  # (N, D) L2-normalised


def label_cache_dir() -> Path:
    """`label-cache` under `clapcli.home.cache_dir()`: `$CLAP_HOME/label-cache`, else the user cache dir's."""
    return clap_cache_dir() / "label-cache"


def cache_key(model_fingerprint: str, labelset: LabelSet, templates: Sequence[str]) -> dict:
    return {
        "format": CACHE_FORMAT,
        "model_fingerprint": model_fingerprint,
        "labels_sha256": labelset.content_hash,
        "n_labels": len(labelset),
        "templates": list(templates),
    }


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def cached_label_embeddings(
    model: TextEmbedder,
    labelset: LabelSet,
    templates: Sequence[str] | None,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Ensembled label embeddings (L, D): from the cache, or encoded with `model.embed_text` and stored."""
    templates = check_templates(templates)
    # Embeddings at a precision other than fp32 (bf16, int8) are close to fp32's but not equal: kept apart.
    precision = getattr(model, "precision", "fp32")
    key = cache_key(str(model.fingerprint) + ("" if precision == "fp32" else f"/{precision}"), labelset, templates)
    directory = Path(cache_dir) if cache_dir is not None else label_cache_dir()
    digest = _key_digest(key)
    array_path, meta_path = directory / f"{digest}.npy", directory / f"{digest}.json"

    cached = _load(array_path, meta_path, key)
    if cached is not None:
        return cached

    prompts = render(templates, labelset.labels)
    text_emb = np.asarray(model.embed_text(prompts), dtype=np.float32)  # (T*L, D)
    emb = label_embeddings(text_emb, len(templates), len(labelset))  # (L, D)
    meta = {"key": key, "labelset": labelset.name, "dim": int(emb.shape[1])}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_npy(array_path, emb)
        atomic_write(meta_path, json.dumps(meta, ensure_ascii=False, indent=1))
    except OSError as err:
        # A read-only or full cache costs speed, never the result.
        warnings.warn(f"could not cache label embeddings in {directory}: {err}", stacklevel=2)
    return emb


def _load(array_path: Path, meta_path: Path, key: dict) -> np.ndarray | None:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("key") != key:
            return None  # a digest collision or a hand-edited entry: recompute
        emb = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError, AttributeError):
        return None  # missing, truncated or not ours: a miss
    if emb.ndim != 2 or emb.shape[0] != key["n_labels"] or emb.dtype != np.float32 or not np.isfinite(emb).all():
        return None
    return emb
