"""`clap eval`: the paper's retrieval and zero-shot protocols on held-out data, as one library call each.

Audio is embedded exactly as `clap index` embeds it (`Clap.embed_files` / `Clap.embed_waveforms`: fusion
crops at fixed positions, full-coverage windows for unfused models), in batches, so a number here is what a
user of the model gets. The data is resolved and checked BEFORE any model is loaded (`open_retrieval_data`,
`read_zeroshot_data`, `match_classes`), so a typo fails in milliseconds with a usage error.

- Retrieval (`evaluate_retrieval`): text→audio over every caption, audio→text by the best-ranked of an audio's
  captions, audio→text mAP@10 on sorted caption positions (`metrics.retrieval_metrics`), plus LAION's
  unsorted variant as `a2t_mAP@10_laion_quirk`.
- Zero-shot (`evaluate_zeroshot`): each clip against the prompt-ensembled label embeddings (the label cache of
  `clap tag`); top-1/5/10 accuracy, mAP@10 and mean rank of the true label, per-class accuracy, the most
  confused pairs (`metrics.zeroshot_metrics`).

A clip that cannot be read (or a shard sample without a caption) is skipped and reported, never fatal;
nothing embedded at all is a DataError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..data.labelled import LabelledClip, read_labelled
from ..data.manifest import MANIFEST_SUFFIXES, read_rows
from ..errors import DataError, UsageError
from .metrics import a2t_map10_laion_quirk, multilabel_map, retrieval_metrics, zeroshot_metrics

SPLITS = ("train", "val")
ESC50_COLUMNS = ("filename", "category")  # a CSV with these columns is ESC-50's meta/esc50.csv
MAX_CONFUSIONS = 10  # confused (target, predicted) pairs reported

Progress = Callable[[int], None]  # called with the number of clips just finished
OnSkip = Callable[[str, str], None]  # (where, reason) for each clip left out


@dataclass(frozen=True)
class Skipped:
    path: str  # the file, or "SHARD: KEY" for a shard sample
    reason: str

    def to_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}


# ------------------------------------------------------------------------------------------------ retrieval


@dataclass
class RetrievalData:
    """Where the audio–caption pairs come from, checked but not yet read."""

    source: str  # --data as given
    kind: str  # "shards" or "manifest"
    split: str | None  # "train" / "val" of a `shards make` output; None otherwise
    total: int  # samples (shards, from sizes.json) or manifest rows
    urls: list[str] = field(default_factory=list)  # shards
    items: list = field(default_factory=list)  # manifest rows (sources.SourceItem)


def open_retrieval_data(data: str | os.PathLike, split: str | None = None) -> RetrievalData:
    """A `shards make` output (its `val/` by default when present, else `train/`; `split` picks), a folder of
    tars with sizes.json, or a CSV/JSONL manifest with `path` and `caption` (a string or a JSON list)."""
    from ..data.shards import resolve_split
    from ..data.sources import read_manifest

    root = Path(data).expanduser()
    if split is not None and split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not root.exists():
        raise UsageError(f"{root}: no such folder of shards or manifest")
    if root.is_file():
        if root.suffix.lower() not in MANIFEST_SUFFIXES:
            raise UsageError(f"{root}: retrieval data is a folder of shards or a .csv/.jsonl manifest")
        if split is not None:
            raise UsageError("--split applies to a `clap shards make` output folder, not to a manifest")
        items = read_manifest(root)
        if not items:
            raise DataError("the manifest lists no clips", source=str(root))
        return RetrievalData(str(data), "manifest", None, len(items), items=items)
    is_make_output = (root / "train").is_dir() and not any(root.glob("*.tar"))
    if not is_make_output:
        if split is not None:
            raise UsageError(f"--split applies to a `clap shards make` output (with train/ and val/); {root} is "
                             "one split folder already")
        chosen = None
    else:
        chosen = split or ("val" if (root / "val").is_dir() else "train")
        if not (root / chosen).is_dir():
            raise UsageError(f"{root} has no {chosen}/ split (make one with `clap shards make --val-fraction`)")
    shard_split = resolve_split(root / chosen if chosen else root)
    return RetrievalData(str(data), "shards", chosen, shard_split.num_samples, urls=shard_split.urls)


@dataclass
class RetrievalReport:
    data: str
    split: str | None
    audios: int  # clips evaluated
    captions: int  # captions evaluated (several per clip allowed)
    metrics: dict  # retrieval_metrics' keys plus a2t_mAP@10_laion_quirk
    skipped: list[Skipped]

    def to_dict(self) -> dict:
        return {"task": "retrieval", "data": self.data, "split": self.split, "audios": self.audios,
                "captions": self.captions, "skipped": len(self.skipped),
                "skipped_files": [s.to_dict() for s in self.skipped],
                "metrics": {k: round(v, 6) for k, v in self.metrics.items()}}


def evaluate_retrieval(model, data: RetrievalData, batch_size: int = 8, progress: Progress | None = None,
                       on_skip: OnSkip | None = None) -> RetrievalReport:
    """Embed every clip and caption of `data` with `model` (a `clapcli.engine.clap.Clap`) and score retrieval."""
    audio: list[np.ndarray] = []
    captions: list[str] = []
    owner: list[int] = []
    skipped: list[Skipped] = []

    def skip(where: str, reason: str) -> None:
        skipped.append(Skipped(where, reason))
        if on_skip is not None:
            on_skip(where, reason)
        if progress is not None:
            progress(1)

    def keep(embedding: np.ndarray, texts: list[str]) -> None:
        captions.extend(texts)
        owner.extend([len(audio)] * len(texts))
        audio.append(embedding)

    if data.kind == "shards":
        pairs = _shard_waveforms(model, data.urls, skip)
        for batch in _batches(pairs, batch_size):
            embedded = model.embed_waveforms([w for w, _ in batch], segments=False, batch_size=batch_size)
            for e, (_, texts) in zip(embedded, batch):
                keep(e.embedding, texts)
            if progress is not None:
                progress(len(batch))
    else:
        with_text = []
        for item in data.items:
            texts = [item.text] if isinstance(item.text, str) else list(item.text or [])
            if texts:
                with_text.append((item.path, texts))
            else:
                skip(str(item.path), "no caption")
        results = model.embed_files([p for p, _ in with_text], batch_size=batch_size, segments=False)
        for e, (path, texts) in zip(results, with_text):
            if e.error is not None:
                skip(str(path), e.error)
                continue
            keep(e.embedding, texts)
            if progress is not None:
                progress(1)
    if not audio:
        raise DataError(f"no clip could be evaluated ({len(skipped)} skipped)", source=data.source)
    audio_emb = np.stack(audio)  # (N, D)
    text_emb = model.embed_text(captions)  # (M, D)
    metrics = retrieval_metrics(audio_emb, text_emb, np.asarray(owner))
    metrics["a2t_mAP@10_laion_quirk"] = a2t_map10_laion_quirk(audio_emb, text_emb, np.asarray(owner))
    return RetrievalReport(data.source, data.split, len(audio), len(captions), metrics, skipped)


def _shard_waveforms(model, urls: list[str], skip) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(48 kHz waveform, captions) of every usable shard sample; undecodable or caption-less ones skipped."""
    from ..data.shards import decode_audio, iter_shard, select_text

    sr, quantize = model.config.frontend.sample_rate, model.config.frontend.quantize_int16
    for url in urls:
        for raw in iter_shard(url):  # a broken tar is a DataError: the split itself is unusable
            where = f"{url}: {raw.key}"
            try:
                texts = select_text(raw.meta, "text", key=raw.key)
                wave = decode_audio(raw, sr, quantize)
            except DataError as exc:
                skip(where, exc.reason)
                continue
            yield wave, texts


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------------ zero-shot


def read_zeroshot_data(data: str | os.PathLike, fold: int | None = None) -> list[LabelledClip]:
    """Labelled clips: class subfolders, a `path,label` CSV/JSONL (optionally with a `fold` column), or the
    public ESC-50 layout: its folder or its `meta/esc50.csv` (`filename`, `category`, `fold`; audio in
    `../audio/`). `fold` keeps one fold; it needs a manifest with a fold column."""
    root = Path(data).expanduser()
    if not root.exists():
        raise UsageError(f"{root}: no such folder or manifest")
    if root.is_dir() and (root / "meta" / "esc50.csv").is_file():
        root = root / "meta" / "esc50.csv"  # the ESC-50 folder itself
    if root.is_dir():
        if fold is not None:
            raise UsageError("--fold needs a manifest with a 'fold' column (such as ESC-50's meta/esc50.csv), "
                             f"not a folder of class subfolders: {root}")
        return read_labelled(root)
    manifest = read_rows(root, what="a labelled manifest")
    rows = [row for _, row in manifest.rows]
    columns = set(rows[0]) if rows else set()
    if all(c in columns for c in ESC50_COLUMNS):
        audio_dir = root.resolve().parent.parent / "audio"
        if not audio_dir.is_dir():
            raise DataError(f"ESC-50 layout: the audio folder {audio_dir} is missing", source=str(root))
        clips, folds = [], []
        for number, row in manifest.rows:
            name, category = str(row.get("filename") or "").strip(), str(row.get("category") or "").strip()
            if not name or not category:
                raise DataError(f"line {number}: needs 'filename' and 'category'", source=str(root))
            clips.append(LabelledClip(audio_dir / name, category))
            folds.append(row.get("fold"))
    else:
        clips = read_labelled(root)
        folds = [row.get("fold") for row in rows]
    if fold is None:
        return clips
    if "fold" not in columns:
        raise UsageError(f"--fold {fold}: {root} has no 'fold' column")
    kept = [c for c, f in zip(clips, folds) if str(f).strip() == str(fold)]
    if not kept:
        present = sorted({str(f).strip() for f in folds}, key=lambda s: (len(s), s))
        raise UsageError(f"--fold {fold}: no clip in that fold; {root} has folds {', '.join(present)}")
    return kept


def _normal(name: str) -> str:
    """How a class name meets a label: case, underscores and runs of spaces do not matter."""
    return " ".join(name.replace("_", " ").lower().split())


def match_classes(clips: Sequence[LabelledClip], labelset, exclude: Sequence[str] = ()):
    """(label set without `exclude`, targets (N,), clips kept): each clip's class as an index into the set.

    A class matches a label exactly, else after `_normal` (ESC-50's `door_wood_knock` is the label
    `door wood knock`). Clips of an excluded class are dropped. A class that matches no label, or an excluded
    name that is neither a label nor a class, is a UsageError listing a few.
    """
    from ..tagging.labels import LabelSet

    excluded = {_normal(e) for e in exclude if e.strip()}
    known = {_normal(label) for label in labelset.labels} | {_normal(c.label) for c in clips}
    unknown = sorted(e for e in excluded if e not in known)
    if unknown:
        raise UsageError(f"--exclude names no label or class: {_few(unknown)}")
    labels = [label for label in labelset.labels if _normal(label) not in excluded]
    if not labels:
        raise UsageError("--exclude leaves no label")
    kept_set = LabelSet(labelset.name, labels)
    exact = {label: i for i, label in enumerate(labels)}
    loose: dict[str, int] = {}
    for i, label in enumerate(labels):
        loose.setdefault(_normal(label), i)
    kept, targets, missing = [], [], set()
    for clip in clips:
        if _normal(clip.label) in excluded:
            continue
        index = exact.get(clip.label, loose.get(_normal(clip.label)))
        if index is None:
            missing.add(clip.label)
            continue
        kept.append(clip)
        targets.append(index)
    if missing:
        raise UsageError(f"{len(missing)} class(es) of the data are not in the label set {labelset.name!r}: "
                         f"{_few(sorted(missing))} (give --labels a set that has them, or --exclude them)")
    if not kept:
        raise UsageError("--exclude leaves no clip to evaluate")
    return kept_set, np.asarray(targets, dtype=np.int64), kept


@dataclass
class ZeroShotReport:
    data: str
    labelset: str  # its name
    labels: list[str]  # the labels scored against, after --exclude
    templates: list[str]
    fold: int | None
    clips: int  # clips evaluated
    metrics: dict  # top1, top5, top10, mAP@10, mean_rank
    per_class: list[dict]  # {"label", "clips", "accuracy"} for every label that has clips, in label order
    confusions: list[dict]  # {"target", "predicted", "count"}, most frequent first
    skipped: list[Skipped]

    def to_dict(self) -> dict:
        return {"task": "zeroshot", "data": self.data, "labelset": self.labelset, "labels": len(self.labels),
                "templates": self.templates, "fold": self.fold, "clips": self.clips,
                "skipped": len(self.skipped), "skipped_files": [s.to_dict() for s in self.skipped],
                "metrics": {k: round(v, 6) for k, v in self.metrics.items()},
                "per_class": [{**c, "accuracy": round(c["accuracy"], 6)} for c in self.per_class],
                "confusions": self.confusions}


def evaluate_zeroshot(model, clips: Sequence[LabelledClip], targets: np.ndarray, labelset,
                      templates: Sequence[str] | None = None, batch_size: int = 8, data: str = "",
                      fold: int | None = None, progress: Progress | None = None,
                      on_skip: OnSkip | None = None) -> ZeroShotReport:
    """Classify `clips` (true label index `targets`) against `labelset` put into `templates` (ensembled)."""
    from ..tagging.cache import cached_label_embeddings
    from ..tagging.prompts import check_templates

    templates = check_templates(templates)
    label_emb = cached_label_embeddings(model, labelset, templates)  # (L, D), cached on disk per model
    audio, kept_targets, kept_clips, skipped = [], [], [], []
    for clip, target, e in zip(clips, targets,
                               model.embed_files([c.path for c in clips], batch_size=batch_size, segments=False)):
        if e.error is not None:
            skipped.append(Skipped(str(clip.path), e.error))
            if on_skip is not None:
                on_skip(str(clip.path), e.error)
        else:
            audio.append(e.embedding)
            kept_targets.append(target)
            kept_clips.append(clip)
        if progress is not None:
            progress(1)
    if not audio:
        raise DataError(f"no clip could be evaluated ({len(skipped)} skipped)", source=data or None)
    kept_targets = np.asarray(kept_targets, dtype=np.int64)
    result = zeroshot_metrics(np.stack(audio), label_emb, kept_targets, max_confusions=MAX_CONFUSIONS)
    labels = labelset.labels
    counts = np.bincount(kept_targets, minlength=len(labels))
    per_class = [{"label": labels[i], "clips": int(counts[i]), "accuracy": acc}
                 for i, acc in enumerate(result["per_class"]) if acc is not None]
    confusions = [{"target": labels[c["target"]], "predicted": labels[c["predicted"]], "count": c["count"]}
                  for c in result["confusions"]]
    metrics = {k: v for k, v in result.items() if isinstance(v, float)}
    if any(len(c.all_labels) > 1 for c in kept_clips):  # multi-label rows: mAP over labels, as for FSD50K
        metrics["mAP"] = multilabel_map(np.stack(audio) @ label_emb.T, _multi_hot(kept_clips, labels))
    return ZeroShotReport(data, labelset.name, list(labels), templates, fold, len(audio), metrics, per_class,
                          confusions, skipped)


def _multi_hot(clips: Sequence[LabelledClip], labels: Sequence[str]) -> np.ndarray:
    """(N, L) 0/1: every class of each clip (matched to the labels as `match_classes` does)."""
    exact = {label: i for i, label in enumerate(labels)}
    loose: dict[str, int] = {}
    for i, label in enumerate(labels):
        loose.setdefault(_normal(label), i)
    hot = np.zeros((len(clips), len(labels)), dtype=np.float32)
    for row, clip in enumerate(clips):
        for name in clip.all_labels:
            index = exact.get(name, loose.get(_normal(name)))
            if index is not None:
                hot[row, index] = 1.0
    return hot


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
