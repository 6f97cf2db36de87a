"""Query an index: text terms, `--not` terms and example audio → files ranked by their best segment.

The query vector is the normalised sum of the positive embeddings minus the negative ones; an example file
that is in the index, unchanged, brings its stored vector (no model, no audio work). Every stored segment (a
file-level vector, and 10 s windows of long files) is a candidate; a file scores its best segment, and its
time offset is that of its best-scoring window (for files with windows). Up to `per_file` matching windows
of a long file are given as time ranges, adjacent ones merged. A hit whose file is gone from disk (deleted
since `clap index` ran) is flagged `missing`, or left out on request.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, NamedTuple, Sequence

import numpy as np

from ..errors import ClapError, IndexStoreError
from .lookup import stored_file
from .rows import SegmentRow
from .store import IndexStore


class TimeRange(NamedTuple):
    start: float  # seconds
    end: float
    score: float  # cosine similarity of the query and the best window in the range

    def to_dict(self) -> dict:
        return {"start": round(float(self.start), 3), "end": round(float(self.end), 3),
                "score": round(float(self.score), 6)}


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity of the query and the file's best segment
    path: str
    start: float | None  # seconds: the best window of a long file; None for files without windows
    end: float | None
    duration: float | None
    ranges: list[TimeRange] = field(default_factory=list)  # matching windows, adjacent ones merged; best first
    missing: bool = False  # the file is no longer on disk (the index has not caught up yet)

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
        return {"rank": self.rank, "score": round(self.score, 6), "path": self.path,
                "start": r(self.start), "end": r(self.end), "duration": r(self.duration),
                "ranges": [t.to_dict() for t in self.ranges], "missing": self.missing}


def stored_vectors(store: IndexStore, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """The stored file-level vectors of those example files that are in the index and unchanged on disk, keyed
    by the path as given: they need no model. The others are not in the result (the caller embeds them)."""
    found = {}
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:  # a name that is not UTF-8 is never indexed (`clap index` skips it)
            continue
        stored = stored_file(store, path)
        if stored is not None:
            found[path] = stored.vector
    return found


def query_vector(model, texts: Sequence[str] = (), negatives: Sequence[str] = (),
                 audio: Sequence[str] = (), cache: bool = False, *, negative_audio: Sequence[str] = (),
                 stored: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """The normalised sum of the positive embeddings (texts, example audio) minus the negative ones (`negatives`
    texts, `negative_audio` files). Example files found in `stored` (see `stored_vectors`) take that vector; the
    model embeds the rest, and may be None when nothing is left to embed. With `cache`, texts come from the
    model's in-process embedding cache when embedded before (`Clap.embed_text(cache=True)`)."""
    stored = stored or {}

    def embed_text(items: Sequence[str]) -> list[np.ndarray]:
        if not items:
            return []
        return list(model.embed_text(list(items), cache=True) if cache else model.embed_text(list(items)))

    def embed_audio(paths: Sequence[str]) -> list[np.ndarray]:
        vectors = []
        for path in paths:
            if path in stored:
                vectors.append(stored[path])
                continue
            result = next(iter(model.embed_files([path], segments=False)))
            if result.error:
                raise ClapError(f"cannot use {path} as a query: {result.error}")
            vectors.append(result.embedding)
        return vectors

    positives = embed_text(texts) + embed_audio(audio)
    if not positives:
        raise ClapError("nothing to search for: give a text query and/or --audio FILE")
    q = np.sum(positives, axis=0)
    pushed = embed_text(negatives) + embed_audio(negative_audio)
    if pushed:
        q = q - np.sum(pushed, axis=0)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-6:
        raise ClapError("the query terms cancel out; drop a --not term")
    return (q / norm).astype(np.float32)


def model_mismatch_advice(index: str | None, model: str, given: bool = True) -> str:
    """How to fix a search whose model is not the index's, with the flags each command has: `given` when the
    model came from `--model`, else the index's remembered place now holds other weights."""
    where = f" --index {index}" if index else ""
    rebuild = f"`clap index DIR…{where} --model {model} --rebuild`"
    if given:
        return f"search without --model to use the index's own model, or rebuild the index with this one: {rebuild}"
    return (f"the weights at {model} have changed since; pass the index's model with --model PATH, or rebuild "
            f"the index with these weights: {rebuild}")


def moved_model_advice(index: str | None) -> str:
    """How `clap search` takes the new place of an index's model folder that has moved."""
    where = f" --index {index}" if index else ""
    return (f"pass its new place with --model NEW_PATH, and record it in the index with "
            f"`clap index DIR…{where} --model NEW_PATH`")


def open_for_search(index_dir: Path) -> IndexStore:
    if not IndexStore.exists(index_dir):
        raise IndexStoreError(f"no index at {index_dir}; build one with `clap index DIR`")
    store = IndexStore.open(index_dir, readonly=True)
    if store.counts().embeddings == 0:
        store.close()
        raise IndexStoreError(f"index {index_dir} is empty; add files with `clap index DIR --index {index_dir}`")
    return store


class Searcher:
    """Answers any number of queries on one open store (`clap search --stdin`): the nearest-neighbour
    graph is loaded once and synced again only when the store's generation moves on (`clap index`
    committed meanwhile). `keep`, a test of stored paths, leaves out the files it refuses (`--tag`: see
    index/tag_store.tag_filter); more neighbours are fetched until k files pass."""

    def __init__(self, store: IndexStore, keep: Callable[[str], bool] | None = None, persist: bool | None = None):
        self.store = store
        self.keep = keep
        self.persist = persist  # AnnIndex.sync's: None refreshes the saved graph when it can; False never writes
        self._ann = None
        self.missing_left_out = 0  # how many gone files the last search with skip_missing passed over

    def search(self, query: np.ndarray, k: int = 10, min_score: float | None = None, *, per_file: int = 1,
               exclude: Collection[str] = (), skip_missing: bool = False) -> list[Hit]:
        """The k best files. `per_file`: how many matching windows of a long file to give as ranges; `exclude`:
        stored paths never to return (the example files themselves); `skip_missing`: leave out files that are
        gone from disk (else they are returned flagged `missing`)."""
        from .ann import AnnIndex

        with self.store.snapshot():  # one consistent state, even while `clap index` commits
            if self._ann is None or self._ann.generation != self.store.generation:
                self._ann = AnnIndex.sync(self.store, persist=self.persist)
            hits, self.missing_left_out = _search(self.store, self._ann, query, k, min_score, per_file,
                                                  frozenset(exclude), skip_missing, self.keep)
            return hits


def _search(store: IndexStore, ann, query: np.ndarray, k: int, min_score: float | None, per_file: int,
            exclude: frozenset[str], skip_missing: bool,
            keep: Callable[[str], bool] | None = None) -> tuple[list[Hit], int]:
    """The hits, and how many gone files were passed over to find them (with `skip_missing`)."""
    total = ann.count
    fetch = min(total, max(4 * k, 32))
    on_disk: dict[str, bool] = {}
    while True:
        ids, scores = ann.query(query, fetch)
        best: dict[str, tuple[float, SegmentRow]] = {}  # path → (its best score, that segment)
        rows = {r.segment_id: r for r in store.segment_rows(ids[0])}
        for seg_id, score in zip(ids[0].tolist(), scores[0].tolist()):
            row = rows.get(seg_id)
            if row is None or row.path in exclude:  # deleted since the hnsw file was written; the example itself
                continue
            if keep is not None and not keep(row.path):
                continue
            if row.path not in best or score > best[row.path][0]:
                best[row.path] = (score, row)
        kept, passed_over, cut = [], 0, False
        for path, (score, row) in sorted(best.items(), key=lambda item: -item[1][0]):
            if len(kept) == k:
                break
            if min_score is not None and score < min_score:
                cut = True
                break
            if path not in on_disk:
                on_disk[path] = os.path.exists(path)
            if not on_disk[path] and skip_missing:
                passed_over += 1
                continue
            kept.append((path, score, row))
        if len(kept) == k or cut or fetch >= total:
            break
        fetch = min(total, fetch * 4)
    hits = []
    for path, score, row in kept:
        best_window, ranges = _matching_windows(store, path, query, per_file, min_score)
        start, end = (best_window.start, best_window.end) if best_window else (None, None)
        hits.append(Hit(len(hits) + 1, float(score), path, start, end, row.duration, ranges,
                        missing=not on_disk[path]))
    return hits, passed_over


def _matching_windows(store: IndexStore, path: str, query: np.ndarray, per_file: int,
                      min_score: float | None) -> tuple[SegmentRow | None, list[TimeRange]]:
    """A file's best window, and its `per_file` best windows (those after the best one only when they reach
    `min_score`) as time ranges, adjacent or overlapping ones merged into one range scored by its best window,
    best first. (None, []) for a file without windows."""
    windows = [r for r in store.file_segments(path) if r.kind == "window"]
    if not windows:
        return None, []
    ids, vecs = store.vectors_by_id([r.segment_id for r in windows])
    by_id = {r.segment_id: r for r in windows}
    scored = sorted(zip((by_id[int(i)] for i in ids.tolist()), (vecs @ query).tolist()), key=lambda w: -w[1])
    chosen = scored[:1] + [w for w in scored[1:per_file] if min_score is None or w[1] >= min_score]
    merged: list[TimeRange] = []
    for row, score in sorted(chosen, key=lambda w: w[0].start):
        if merged and row.start <= merged[-1].end + 1e-6:
            last = merged[-1]
            merged[-1] = TimeRange(last.start, max(last.end, row.end), max(last.score, score))
        else:
            merged.append(TimeRange(row.start, row.end, score))
    return scored[0][0], sorted(merged, key=lambda t: -t.score)
