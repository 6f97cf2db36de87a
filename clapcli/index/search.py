"""Query an index: text terms, `--not` terms and example audio → files ranked by their best segment.

The query vector is the normalised sum of the positive embeddings minus the negative ones. Every
stored segment (a file-level vector, and 10 s windows of long files) is a candidate; a file scores
its best segment, and its time offset is that of its best-scoring window (for files with windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ClapError, IndexStoreError
from .store import IndexStore


@dataclass
class Hit:
    rank: int
    score: float  # cosine similarity of the query and the file's best segment
    path: str
    start: float | None  # seconds: the best window of a long file; None for files without windows
    end: float | None
    duration: float | None

    def to_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 3)  # noqa: E731
        return {"rank": self.rank, "score": round(self.score, 6), "path": self.path,
                "start": r(self.start), "end": r(self.end), "duration": r(self.duration)}


def query_vector(model, texts: Sequence[str] = (), negatives: Sequence[str] = (),
                 audio: Sequence[str] = (), cache: bool = False) -> np.ndarray:
    """The normalised sum of the positive embeddings minus the negative ones. With `cache`, texts come from
    the model's in-process embedding cache when embedded before (`Clap.embed_text(cache=True)`)."""

    def embed_text(items: Sequence[str]) -> np.ndarray:
        return model.embed_text(list(items), cache=True) if cache else model.embed_text(list(items))

    positives = []
    if texts:
        positives.extend(embed_text(texts))
    for path in audio:
        result = next(iter(model.embed_files([path], segments=False)))
        if result.error:
            raise ClapError(f"cannot use {path} as a query: {result.error}")
        positives.append(result.embedding)
    if not positives:
        raise ClapError("nothing to search for: give a text query and/or --audio FILE")
    q = np.sum(positives, axis=0)
    if negatives:
        q = q - np.sum(embed_text(negatives), axis=0)
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

    def __init__(self, store: IndexStore, keep: Callable[[str], bool] | None = None):
        self.store = store
        self.keep = keep
        self._ann = None

    def search(self, query: np.ndarray, k: int = 10, min_score: float | None = None) -> list[Hit]:
        from .ann import AnnIndex

        with self.store.snapshot():  # one consistent state, even while `clap index` commits
            if self._ann is None or self._ann.generation != self.store.generation:
                self._ann = AnnIndex.sync(self.store, persist=None)
            return _search(self.store, self._ann, query, k, min_score, self.keep)


def _search(store: IndexStore, ann, query: np.ndarray, k: int, min_score: float | None,
            keep: Callable[[str], bool] | None = None) -> list[Hit]:
    total = ann.count
    fetch = min(total, max(4 * k, 32))
    while True:
        ids, scores = ann.query(query, fetch)
        best: dict[str, tuple[float, object]] = {}  # path → (its best score, that segment)
        rows = {r.segment_id: r for r in store.segment_rows(ids[0])}
        for seg_id, score in zip(ids[0].tolist(), scores[0].tolist()):
            row = rows.get(seg_id)
            if row is None:  # deleted since the hnsw file was written
                continue
            if keep is not None and not keep(row.path):
                continue
            if row.path not in best or score > best[row.path][0]:
                best[row.path] = (score, row)
        if len(best) >= k or fetch >= total:
            break
        fetch = min(total, fetch * 4)
    ranked = sorted(best.items(), key=lambda item: -item[1][0])[:k]
    hits = []
    for path, (score, row) in ranked:
        if min_score is not None and score < min_score:
            break
        start, end = _best_window(store, path, query) if row.kind == "file" else (row.start, row.end)
        hits.append(Hit(len(hits) + 1, float(score), path, start, end, row.duration))
    return hits


def _best_window(store: IndexStore, path: str, query: np.ndarray) -> tuple[float | None, float | None]:
    """For a file whose file-level vector matched best, the window that matches best (if it has windows)."""
    windows = [r for r in store.file_segments(path) if r.kind == "window"]
    if not windows:
        return None, None
    ids, vecs = store.vectors_by_id([r.segment_id for r in windows])
    by_id = {r.segment_id: r for r in windows}
    best = int(np.argmax(vecs @ query))
    row = by_id[int(ids[best])]
    return row.start, row.end
