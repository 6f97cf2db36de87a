"""Tag audio files: embed them with a CLAP model, score against a label set, pick the labels to report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .cache import cached_label_embeddings
from .labels import LabelSet
from .scoring import Scorer, ZeroShotScorer, check_selection, select

CSV_HEADER = ("path", "label", "prob", "cosine", "start", "end")


@dataclass(frozen=True)
class LabelScore:
    label: str
    prob: float  # probability over the label set (softmax of logit_scale × cosine for zero-shot)
    cosine: float | None  # audio-label cosine; None for scorers without a joint embedding space

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "prob": _round(self.prob), "cosine": _round(self.cosine)}


@dataclass(frozen=True)
class WindowTags:
    start: float  # seconds from the start of the file
    end: float  # seconds
    labels: list[LabelScore]

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "labels": [label.to_dict() for label in self.labels],
        }


@dataclass(frozen=True)
class FileTags:
    path: str  # as the caller spelled it
    duration: float | None  # seconds; None when the file could not be read
    labels: list[LabelScore]  # file-level labels, best first; empty when the file failed
    timeline: list[WindowTags] | None = None  # per-window labels when asked for; None otherwise
    error: str | None = None  # why the file failed (without the path); None when it was tagged
    partial: str | None = None  # why only part of the file could be decoded (the tags describe that part)

    def to_dict(self) -> dict[str, Any]:
        """The `--json` object: timeline only when computed, error only when the file failed, partial only
        when the file was tagged from the part that decodes."""
        out: dict[str, Any] = {
            "path": self.path,
            "duration": None if self.duration is None else round(self.duration, 3),
            "labels": [label.to_dict() for label in self.labels],
        }
        if self.timeline is not None:
            out["timeline"] = [window.to_dict() for window in self.timeline]
        if self.error is not None:
            out["error"] = self.error
        if self.partial is not None:
            out["partial"] = self.partial
        return out

    def csv_rows(self) -> list[tuple]:
        """`--csv` rows (see CSV_HEADER): file-level rows with empty start/end, then timeline rows."""
        rows: list[tuple] = [(self.path, s.label, _round(s.prob), _round(s.cosine), "", "") for s in self.labels]
        for window in self.timeline or []:
            for s in window.labels:
                rows.append(
                    (self.path, s.label, _round(s.prob), _round(s.cosine), round(window.start, 3), round(window.end, 3))
                )
        return rows


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def zero_shot_scorer(model, labelset: LabelSet, templates: Sequence[str] | None = None) -> ZeroShotScorer:
    """A scorer for `labelset` with `model`'s (cached) prompt-ensembled label embeddings."""
    label_emb = cached_label_embeddings(model, labelset, templates)
    return ZeroShotScorer(labelset.labels, label_emb, float(model.logit_scale))


def tag_files(
    model,
    paths: Iterable[str | os.PathLike],
    labelset: LabelSet | None,
    templates: Sequence[str] | None = None,
    top_k: int | None = 5,
    multi_label: bool = False,
    threshold: float | None = None,
    timeline: bool = False,
    batch_size: int = 8,
    on_progress: Callable[[FileTags], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
    scorer: Scorer | None = None,
    on_audio: Callable[[str, float, float], None] | None = None,
) -> Iterator[FileTags]:
    """Tag each file, yielding one FileTags per path in input order; a bad file yields an error entry.

    `model` follows `clapcli.engine.clap.Clap`'s contract (fingerprint, logit_scale, embed_text, embed_files).
    Labels are chosen by `scoring.select` (top_k, multi_label, threshold). With `timeline`, files longer than 10 s get
    labels per 10 s window (the model's segments); a shorter file's timeline is empty. `scorer` replaces zero-shot scoring (labelset and templates are then
    unused), e.g. with a trained classifier head (`clapcli.models.classifier.Classifier`, whose
    `raw_embeddings` flag asks for un-normalised embeddings). `on_error(path, message)` is called for each failed file
    and `on_progress(file_tags)` once per file, failed or not; `on_audio(path, seconds, expected_seconds)` as
    audio decodes, within long files too (the model's `embed_files` hook).
    """
    check_selection(top_k, multi_label, threshold)  # fail before any text or audio is encoded
    if scorer is None:
        if labelset is None:
            raise ValueError("tag_files needs a labelset or a scorer")
        scorer = zero_shot_scorer(model, labelset, templates)
    labels = scorer.labels

    def pick(audio_emb: np.ndarray) -> list[list[LabelScore]]:  # (N, D) → per row the labels to report
        ranked = select(scorer(audio_emb), top_k, multi_label, threshold)
        return [[LabelScore(labels[r.index], r.prob, r.cosine) for r in row] for row in ranked]

    paths = [os.fspath(p) for p in paths]
    is_file = [os.path.isfile(p) for p in paths]  # checked once: the model's results are matched by position
    readable = [p for p, ok in zip(paths, is_file) if ok]
    # The model yields one AudioEmbedding per input, in order, with `error` set when a file fails.
    # A trained head (`raw_embeddings = True`) reads the projection output before L2 normalisation.
    hooks = {"normalize": False} if getattr(scorer, "raw_embeddings", False) else {}
    if on_audio is not None:
        hooks["on_audio"] = on_audio
    embedded = (iter(model.embed_files(readable, batch_size=batch_size, segments=timeline, **hooks)) if readable
                else iter(()))

    for path, ok in zip(paths, is_file):
        if not ok:
            reason = "is a directory" if os.path.isdir(path) else "no such file"
            result = FileTags(path, None, [], None, reason)
        else:
            item = next(embedded, None)
            if item is None:
                result = FileTags(path, None, [], None, "no result from the audio loader")
            elif item.error is not None:
                result = FileTags(path, None, [], None, str(item.error))  # the reason alone, path-free
            else:
                result = _tag_one(path, item, pick, timeline)
        if result.error is not None and on_error is not None:
            on_error(path, result.error)
        if on_progress is not None:
            on_progress(result)
        yield result


def _tag_one(path: str, item, pick, timeline: bool) -> FileTags:
    duration = _duration(item)
    embedding = np.asarray(item.embedding, dtype=np.float32)[None, :]  # (1, D)
    file_labels = pick(embedding)[0]
    windows = None
    if timeline:
        segments = list(item.segments or [])
        if segments:
            seg_emb = np.stack([np.asarray(s.embedding, dtype=np.float32) for s in segments])  # (S, D)
            windows = [
                WindowTags(float(s.start), float(s.end), seg_labels)
                for s, seg_labels in zip(segments, pick(seg_emb))
            ]
        else:
            windows = []  # ≤ 10 s: the file-level labels are the whole story; no window repeats them
    return FileTags(path, duration, file_labels, windows, None, getattr(item, "partial", None))


def _duration(item) -> float | None:
    duration = getattr(item, "duration", None)
    return None if duration is None else float(duration)
