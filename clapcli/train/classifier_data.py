"""The labelled data a classifier trains on (`clap finetune`): reading it (class folders, a manifest, or
shards), the label list, a stratified validation split, and the on-disk cache of clip embeddings the frozen
probe trains on (by model fingerprint and file content hash)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..atomic import write_npy
from ..data.labelled import LabelledClip, read_labelled
from ..errors import DataError, UsageError

CACHE_SUBDIR = "finetune-embeddings"  # under clapcli.home.cache_dir()
SHARD_AUDIO_SUBDIR = "finetune-shards"  # audio of shard samples, by content hash, under the cache dir


@dataclass
class Dataset:
    paths: list[Path]
    targets: np.ndarray  # (N,) class indices for single-label, (N, L) 0/1 for multi-label


# ---- data ---------------------------------------------------------------------------------------------
def read_data(source: str | Path, multi_label: bool) -> list[LabelledClip]:
    """Labelled clips with the checks finetuning needs: no empty class folder, no duplicate paths.

    `source` may also be webdataset shards (a `clap shards make` output or a folder of tars with sizes.json):
    each sample's `tag` list gives its labels (see `read_shard_clips`)."""
    root = Path(source).expanduser()
    if _is_shards(root):
        clips = read_shard_clips(root)
        if not multi_label and any(len(c.labels) > 1 for c in clips):
            raise UsageError(f"{root} has samples with several tags; add --multi-label")
        return clips
    if root.is_dir():
        empty = [d.name for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
                 and not any(f.is_file() for f in d.rglob("*"))]
        if empty:
            raise DataError(f"empty class folder(s): {', '.join(empty)}", source=str(root))
    clips = read_labelled(root)
    seen: dict[Path, int] = {}
    for clip in clips:
        key = clip.path.resolve()
        seen[key] = seen.get(key, 0) + 1
    dupes = [str(p) for p, n in seen.items() if n > 1]
    if dupes:
        raise DataError(f"{len(dupes)} path(s) listed more than once, e.g. {dupes[0]}", source=str(root))
    missing = [c.path for c in clips if not c.path.is_file()]
    if missing:
        raise DataError(f"{len(missing)} file(s) not found, e.g. {missing[0]}", source=str(root))
    if not multi_label and any(len(c.labels) > 1 for c in clips):
        raise UsageError(f"{root} gives several labels per clip; add --multi-label")
    return clips


def _is_shards(root: Path) -> bool:
    return root.is_dir() and (any(root.glob("*.tar")) or any((root / "train").glob("*.tar")))


def read_shard_clips(root: Path) -> list[LabelledClip]:
    """The samples of a shard split (its train/ for a `shards make` output) with their `tag` lists as labels.

    Each sample's audio bytes are written once, content-addressed, under the cache dir
    (`finetune-shards/<hash>.<ext>`), so the rest of finetuning (the embedding cache, --full decoding) sees
    ordinary files. A sample without tags is a DataError naming it."""
    from ..atomic import atomic_write
    from ..data.shards import iter_shard, resolve_split
    from ..home import cache_dir

    split = resolve_split(root)
    directory = cache_dir() / SHARD_AUDIO_SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    clips = []
    for url in split.urls:
        for raw in iter_shard(url):
            tags = raw.meta.get("tag")
            tags = [tags] if isinstance(tags, str) else list(tags or [])
            tags = list(dict.fromkeys(str(t).strip() for t in tags if str(t).strip()))
            if not tags:
                raise DataError("sample has no 'tag' list to learn from", source=url, member=raw.key)
            digest = hashlib.blake2b(raw.audio_bytes, digest_size=16).hexdigest()
            f = directory / f"{digest}.{raw.audio_ext}"
            if not f.is_file():
                atomic_write(f, raw.audio_bytes)
            clips.append(LabelledClip(f, tags[0], tuple(tags) if len(tags) > 1 else ()))
    if not clips:
        raise DataError("no samples in these shards", source=str(root))
    return clips


def label_names(clips: list[LabelledClip]) -> list[str]:
    return sorted({label for c in clips for label in c.all_labels})


def to_dataset(clips: list[LabelledClip], labels: list[str], multi_label: bool, what: str) -> Dataset:
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({label for c in clips for label in c.all_labels if label not in index})
    if unknown:
        raise DataError(f"{what} has classes the training data does not: {', '.join(unknown[:10])}")
    if multi_label:
        targets = np.zeros((len(clips), len(labels)), dtype=np.float32)
        for i, c in enumerate(clips):
            targets[i, [index[label] for label in c.all_labels]] = 1.0
    else:
        targets = np.asarray([index[c.label] for c in clips], dtype=np.int64)
    return Dataset([c.path for c in clips], targets)


def stratified_split(clips: list[LabelledClip], fraction: float, seed: int) -> tuple[list, list]:
    """A fixed split by (first) class: each class with ≥ 2 clips gives round(n × fraction) clips, at least
    one and never all, to validation; the same seed and data always give the same split."""
    if not 0 < fraction < 1:
        raise UsageError(f"the validation fraction must be in (0, 1), got {fraction}")
    rng = random.Random(seed)
    by_class: dict[str, list[LabelledClip]] = {}
    for c in clips:
        by_class.setdefault(c.label, []).append(c)
    train, val = [], []
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda c: str(c.path))
        rng.shuffle(members)
        n_val = 0 if len(members) < 2 else min(len(members) - 1, max(1, round(len(members) * fraction)))
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    if not val:
        raise DataError("too few clips for a validation split (each class needs at least 2); give --val")
    return train, val


# ---- embeddings and their cache ----------------------------------------------------------------------
def embedding_cache_dir(model) -> Path:
    from ..home import cache_dir

    return cache_dir() / CACHE_SUBDIR / model.fingerprint


def cached_embeddings(model, paths: list[Path], batch_size: int = 8,
                      on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) raw audio embeddings of `paths`: read from the cache, the misses embedded and then cached.

    Keyed by the model fingerprint and each file's content hash, so a renamed file still hits and an
    edited one does not. A file that cannot be embedded raises DataError naming it."""
    from ..index.store import content_hash

    directory = embedding_cache_dir(model)
    hashes = [content_hash(p) for p in paths]
    out: list[np.ndarray | None] = [None] * len(paths)
    missing = []
    for i, h in enumerate(hashes):
        f = directory / f"{h}.npy"
        if f.is_file():
            try:
                vec = np.load(f, allow_pickle=False)
                if vec.shape == (model.dim,):
                    out[i] = vec
                    continue
            except (OSError, ValueError):
                pass  # a damaged entry is recomputed
        missing.append(i)
    if on_progress and len(paths) > len(missing):
        on_progress(len(paths) - len(missing))
    if missing:
        directory.mkdir(parents=True, exist_ok=True)
        results = model.embed_files([paths[i] for i in missing], batch_size=batch_size, segments=False,
                                    normalize=False)
        for i, e in zip(missing, results):
            if e.error is not None:
                raise DataError(f"cannot read audio: {e.error}", source=str(paths[i]))
            vec = np.asarray(e.embedding, dtype=np.float32)
            out[i] = vec
            write_npy(directory / f"{hashes[i]}.npy", vec)
            if on_progress:
                on_progress(1)
    return np.stack(out).astype(np.float32) if out else np.zeros((0, model.dim), np.float32)


# ---- metrics ------------------------------------------------------------------------------------------
