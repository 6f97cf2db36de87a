"""The map: every file's stored vector projected to 2-D, coloured by folder or top tag (`/api/map`).

PCA with numpy by default (the axes from at most PCA_SAMPLE files, then every file projected: a fraction of a
second at 100,000 files); UMAP when `umap-learn` is importable. Coordinates are scaled into 0…1 and rounded
to 4 digits, so 100,000 points are a few MB of JSON. Kept in memory per index generation and colouring: a new
commit by `clap index` gives a new map on the next request.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from importlib.util import find_spec
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..index.rows import decode_vectors
from ..index.schema import open_database
from ..index.paths import folder_in_index
from .reader import SEARCHABLE

PCA_SAMPLE = 20_000
MAX_GROUPS = 12  # legend entries; the rest are "other"
OTHER = "other"


def project(vectors: np.ndarray) -> tuple[str, np.ndarray]:
    """(method, (N, 2) float32 in 0…1) for (N, D) vectors."""
    n = len(vectors)
    if n == 0:
        return "pca", np.zeros((0, 2), dtype=np.float32)
    if n >= 16 and find_spec("umap") is not None:
        import umap

        xy = umap.UMAP(n_components=2, metric="cosine", random_state=0).fit_transform(vectors)
        return "umap", _unit(np.asarray(xy, dtype=np.float32))
    x = np.asarray(vectors, dtype=np.float32)
    sample = x if n <= PCA_SAMPLE else x[np.random.default_rng(0).choice(n, PCA_SAMPLE, replace=False)]
    mean = sample.mean(axis=0)
    centred = sample - mean
    cov = centred.T @ centred  # (D, D)
    _, eigvecs = np.linalg.eigh(cov.astype(np.float64))
    axes = eigvecs[:, ::-1][:, :2].astype(np.float32)  # (D, 2): the two directions of largest variance
    axes *= np.where(axes.sum(axis=0) < 0, -1, 1).astype(np.float32)  # a fixed sign: the map does not flip
    return "pca", _unit((x - mean) @ axes)


def _unit(xy: np.ndarray) -> np.ndarray:
    low, high = xy.min(axis=0), xy.max(axis=0)
    span = np.where(high - low > 0, high - low, 1.0)
    return ((xy - low) / span).astype(np.float32)


def top_labels(vectors: np.ndarray, label_emb: np.ndarray, rows: int = 8192) -> np.ndarray:
    """The index of each vector's nearest label, (N,): in blocks of rows, so 100,000 files × 527 labels never
    make one 200 MB score matrix."""
    best = [np.argmax(vectors[i : i + rows] @ label_emb.T, axis=1) for i in range(0, len(vectors), rows)]
    return np.concatenate(best) if best else np.zeros(0, dtype=np.int64)


def groups_of(keys: list[str]) -> tuple[list[int], list[str]]:
    """Per point an index into the legend: the MAX_GROUPS - 1 commonest keys by name, the rest `other`."""
    counts = Counter(keys)
    common = [k for k, _ in counts.most_common()]
    legend = sorted(common[: MAX_GROUPS - 1]) if len(common) > MAX_GROUPS else sorted(common)
    if len(common) > len(legend):
        legend.append(OTHER)
    where = {k: i for i, k in enumerate(legend)}
    other = where.get(OTHER)
    return [where.get(k, other) for k in keys], legend


class FileVectors(NamedTuple):
    ids: list[int]  # the files' index ids
    paths: list[str]
    vectors: np.ndarray  # (N, D) float32: each file's file-level vector
    roots: list[str]
    generation: int


def read_file_vectors(index_dir: str | os.PathLike) -> FileVectors:
    """Every searchable file's id, path and file-level vector, in one read transaction of a connection of its
    own (the map is read beside searches, not on the index thread). One joined SELECT rather than the store's
    per-file lookups: 100,000 files in a fraction of a second instead of seconds."""
    conn = open_database(Path(index_dir), create=False, readonly=True)
    try:
        conn.execute("BEGIN")
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('generation', 'dim')").fetchall())
        roots = [r[0] for r in conn.execute("SELECT path FROM roots ORDER BY path")]
        marks = ",".join("?" * len(SEARCHABLE))
        rows = conn.execute(
            f"""SELECT f.id, f.path, e.vector FROM segments s JOIN files f ON f.id = s.file_id
                JOIN embeddings e ON e.segment_id = s.id
                WHERE s.kind = 'file' AND f.status IN ({marks}) ORDER BY f.id""", SEARCHABLE).fetchall()
        conn.execute("COMMIT")
    finally:
        conn.close()
    dim = int(meta["dim"]) if "dim" in meta else None
    if rows:
        _, vectors = decode_vectors([(r[0], r[2]) for r in rows], dim, Path(index_dir))
    else:
        vectors = np.zeros((0, dim or 0), dtype=np.float32)
    return FileVectors([r[0] for r in rows], [r[1] for r in rows], vectors, roots, int(meta.get("generation", 0)))


class MapCache:
    """The last map per colouring, with the generation it shows."""

    def __init__(self):
        self._maps: dict[str, tuple[int, bytes]] = {}
        self._lock = asyncio.Lock()

    async def answer(self, served, color: str) -> bytes:
        from starlette.concurrency import run_in_threadpool

        async with self._lock:
            generation = await served.index(lambda: served.reader.store.generation)
            cached = self._maps.get(color)
            if cached is not None and cached[0] == generation:
                return cached[1]
            label_emb = await served.index(served.reader.label_embeddings) if color == "tag" else None
            files = await run_in_threadpool(read_file_vectors, served.reader.index_dir)
            body = await run_in_threadpool(_build, files, color, label_emb, served.reader.labelset.labels)
            self._maps[color] = (files.generation, body)
            return body


def _build(files: FileVectors, color: str, label_emb: np.ndarray | None, labels: list[str]) -> bytes:
    method, xy = project(files.vectors)
    folder_of: dict[str, str] = {}  # files share folders: each is placed once
    folders, names = [], []
    for path in files.paths:
        parent, _, name = path.rpartition(os.sep)
        if parent not in folder_of:
            folder_of[parent] = folder_in_index(path, files.roots)
        folders.append(folder_of[parent])
        names.append(name)
    if color == "tag":
        keys = [labels[i] for i in top_labels(files.vectors, label_emb)]
    else:
        keys = [f.split(os.sep, 1)[0] for f in folders]
    groups, legend = groups_of(keys)
    body = {
        "method": method, "color": color, "ids": files.ids,
        "x": np.round(xy[:, 0], 4).tolist(), "y": np.round(xy[:, 1], 4).tolist(),
        "names": names, "folders": folders,
        "paths": files.paths,  # what the page's lasso lists and downloads
        "groups": groups, "legend": legend,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
