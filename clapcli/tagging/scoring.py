"""Zero-shot scoring: pure numpy functions from audio and label embeddings to ranked labels.

Every scorer returns `Scores` with two (N, L) arrays for N audio embeddings and L labels:

- `probs`: a distribution over the label set (each row sums to 1). For zero-shot scoring this is
  softmax(logit_scale × cosine), the probability CLAP's contrastive objective was trained to produce,
  as in the paper's zero-shot protocol. It ranks the labels of one clip, and its meaning is the same in
  single- and multi-label mode.
- `cosine`: the raw cosine similarity between the audio and each label's (ensembled) text embedding.

How labels are selected (`select`):

- single-label (default): the `k` labels with the highest probability; an optional `threshold` drops
  those whose probability is below it.
- multi-label: every label whose *cosine* is at least `threshold`, best first (optionally capped at `k`).
  A softmax probability cannot decide several labels independently: labels compete for one unit of mass,
  so a clip where a dog barks over rain splits it, and adding a near-synonym to the set lowers both.
  CLAP has no calibrated per-label probability either (there is no trained bias to put into a sigmoid),
  so the honest independent per-label score is the cosine itself: whether "dog" is on does not depend on
  what else is in the label set. The right cut-off depends on the model, so multi-label mode asks for it.

A trained classifier head (`clap tag --classifier DIR`, `clapcli.models.classifier.Classifier`) plugs in
as another `Scorer`: it fills `probs` with its own output (softmax rows, or independent sigmoids for a
multi-label head) and `cosine` with None, and `Scores.independent` then falls back to `probs` for
multi-label decisions. A scorer with `raw_embeddings = True` is fed un-normalised audio embeddings.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from ..errors import UsageError
from ..records import Scores
from ..vectors import l2_normalize


class RankedLabel(NamedTuple):
    index: int  # label index into the scorer's labels
    prob: float  # probability (see Scores.probs)
    cosine: float | None  # cosine similarity, None for scorers without one


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns audio embeddings into label scores: zero-shot today, a trained head later."""

    labels: list[str]

    def __call__(self, audio_emb: np.ndarray) -> Scores: ...


def label_embeddings(text_emb: np.ndarray, n_templates: int, n_labels: int) -> np.ndarray:
    """Prompt-ensemble label embeddings (L, D) from text embeddings of template-major prompts (T*L, D).

    Row t * L + l is template t filled with label l (the order `prompts.render` produces). Each prompt
    embedding is L2-normalised, the T prompts of a label are averaged, and the mean is re-normalised.
    """
    text_emb = np.asarray(text_emb, dtype=np.float32)
    if text_emb.ndim != 2 or text_emb.shape[0] != n_templates * n_labels:
        raise ValueError(
            f"expected ({n_templates} templates × {n_labels} labels, D) text embeddings, got {text_emb.shape}"
        )
    per_template = l2_normalize(text_emb).reshape(n_templates, n_labels, -1)  # (T, L, D)
    return l2_normalize(per_template.mean(axis=0)).astype(np.float32)  # (L, D)


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = logits - logits.max(axis=axis, keepdims=True)  # no overflow for large logit scales
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def score(audio: np.ndarray, labels: np.ndarray, logit_scale: float) -> Scores:
    """Zero-shot scores of N audio embeddings (N, D) against L label embeddings (L, D).

    Both sides are L2-normalised here, so the dot product is the cosine; probabilities are the softmax
    over labels of logit_scale × cosine.
    """
    audio = np.asarray(audio, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None, :]  # (1, D)
    if audio.ndim != 2 or labels.ndim != 2 or audio.shape[1] != labels.shape[1]:
        raise ValueError(f"audio (N, D) and label (L, D) embeddings must share D, got {audio.shape}, {labels.shape}")
    cosine = l2_normalize(audio) @ l2_normalize(labels).T  # (N, L)
    probs = softmax(np.float64(logit_scale) * cosine.astype(np.float64))  # float64: tiny probs stay exact
    return Scores(probs=probs.astype(np.float32), cosine=cosine.astype(np.float32))


def top_k(scores: Scores, k: int | None) -> list[list[RankedLabel]]:
    """Per row, the k labels with the highest probability (all when k is None), best first."""
    return select(scores, k=k)


def select(
    scores: Scores,
    k: int | None = None,
    multi_label: bool = False,
    threshold: float | None = None,
) -> list[list[RankedLabel]]:
    """Per row, the selected labels best first, by the rule in the module docstring.

    Single-label: the top k by probability, minus those with probability < threshold.
    Multi-label: all labels with `scores.independent` (the cosine for zero-shot) ≥ threshold, capped at k.
    """
    check_selection(k, multi_label, threshold)
    probs = scores.probs
    keep = np.ones(probs.shape, dtype=bool)
    if threshold is not None:
        keep = (scores.independent if multi_label else probs) >= threshold
    # Stable sort on -prob: equal probabilities keep label order, so output is deterministic.
    order = np.argsort(-probs, axis=1, kind="stable")  # (N, L)
    rows = []
    for i in range(probs.shape[0]):
        chosen = [int(j) for j in order[i] if keep[i, j]]
        if k is not None:
            chosen = chosen[:k]
        rows.append(
            [
                RankedLabel(
                    index=j,
                    prob=float(probs[i, j]),
                    cosine=None if scores.cosine is None else float(scores.cosine[i, j]),
                )
                for j in chosen
            ]
        )
    return rows


def check_selection(k: int | None, multi_label: bool, threshold: float | None) -> None:
    """Raise UsageError for selection settings `select` cannot honour."""
    if k is not None and k < 1:
        raise UsageError(f"the number of labels to show must be at least 1, got {k}")
    if multi_label and threshold is None:
        raise UsageError("multi-label tagging needs a threshold (a cosine for zero-shot scoring)")


class ZeroShotScorer:
    """Scores audio embeddings against fixed label text embeddings with the model's logit scale."""

    def __init__(self, labels: list[str], label_emb: np.ndarray, logit_scale: float):
        label_emb = np.asarray(label_emb, dtype=np.float32)
        if label_emb.ndim != 2 or label_emb.shape[0] != len(labels):
            raise ValueError(f"{len(labels)} labels need ({len(labels)}, D) embeddings, got {label_emb.shape}")
        self.labels = list(labels)
        self.label_emb = l2_normalize(label_emb)  # (L, D)
        self.logit_scale = float(logit_scale)

    def __call__(self, audio_emb: np.ndarray) -> Scores:
        return score(audio_emb, self.label_emb, self.logit_scale)
