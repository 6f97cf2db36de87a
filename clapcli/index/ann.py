"""Nearest-neighbour search over an index's embeddings: an hnswlib file derived from the SQLite store.

The store is the truth; `vectors.hnsw` is a cache of it that can always be rebuilt. Labels in the
hnswlib graph are segment ids (never reused, see store.py), so the file is kept current by adding the
store's new ids and `mark_deleted` on ids the store no longer has. The sidecar `vectors.hnsw.json` says
which store state the file reflects:

    format, index_uuid, generation     the store's life and `meta.generation` at the time of writing
    max_segment_id, count, live, deleted   highest label, elements in the graph, of which live / deleted
    dim, space, M, ef_construction     what the graph was built with
    file_size, file_mtime_ns           of the hnswlib file it describes (a mismatch means the pair was
                                        torn by a crash, or replaced; the file is then rebuilt)

`AnnIndex.sync(store)` loads the file when the sidecar matches, tops it up when it lags, and rebuilds it
when it is missing, unreadable, from another life of the store, or more than 30% deleted. Both files are
written with `clapcli.atomic.atomic_write` (temporary in the same directory, fsync, `os.replace`), the
graph first and then the sidecar.

Readers (search) never take the writer lock: they sync in memory from one committed snapshot of the
store and write the refreshed file back under the graph lock (lock.py), only if they can take it without
waiting and no newer graph was saved meanwhile, and never try in a directory they cannot write (a read-only
index is searched with the refresh kept in memory). `clap index` writes the file at the end of a run under
the same lock, waiting up to `GRAPH_LOCK_WAIT_S` for a search that is saving (then it leaves the file for
the next search to refresh). Hits from a file that lags are harmless: `IndexStore.segment_rows` leaves out
ids the store no longer has.

Small stores (fewer than `EXACT_BELOW` live vectors) are searched exactly with numpy instead: loading
a few thousand vectors from SQLite costs about as much as loading a graph, and the answer is exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import hnswlib
import numpy as np

from ..atomic import atomic_write, remove_stale_temps
from ..errors import IndexStoreError
from ..vectors import l2_normalize
from .lock import GraphLock
from .store import IndexStore

ANN_FILENAME = "vectors.hnsw"
SIDECAR_FILENAME = "vectors.hnsw.json"
SIDECAR_FORMAT = 1
SPACE = "cosine"
M = 16  # graph degree
EF_CONSTRUCTION = 200  # build-time beam width
MIN_EF = 64  # query-time beam width is max(4 k, MIN_EF)
EXACT_BELOW = 5000  # live vectors below which queries are exact numpy products
REBUILD_DELETED_FRACTION = 0.3  # rebuild instead of topping up when more of the graph would be deleted
GRAPH_LOCK_WAIT_S = 60.0  # how long `clap index` waits for a search that is saving the graph
_RANDOM_SEED = 100


class AnnIndex:
    """The searchable vectors of one index at one committed store state. Build with `AnnIndex.sync`."""

    def __init__(
        self,
        index_dir: Path,
        dim: int,
        generation: int,
        live_count: int,
        *,
        hnsw: hnswlib.Index | None = None,
        exact_ids: np.ndarray | None = None,
        exact_vectors: np.ndarray | None = None,
        action: str = "loaded",
        persisted: bool = False,
    ):
        self.index_dir = index_dir
        self.dim = dim  # embedding dimension (0 for an empty store)
        self.generation = generation  # the store's `meta.generation` this reflects
        self.count = live_count  # live vectors searchable
        self.action = action  # what sync did: 'exact', 'loaded', 'topped_up' or 'rebuilt'
        self.persisted = persisted  # whether sync wrote the hnswlib file
        self._hnsw = hnsw
        self._exact_ids = exact_ids  # (N,) int64
        self._exact_vectors = exact_vectors  # (N, D) float32, L2-normalised

    def __len__(self) -> int:
        return self.count

    # -- building -------------------------------------------------------------------------------------------

    @classmethod
    def sync(
        cls,
        store: IndexStore,
        persist: bool | None = None,
        exact_below: int | None = None,
        num_threads: int = -1,
    ) -> "AnnIndex":
        """Bring the searchable vectors up to the store's last commit and return them.

        `persist`: True writes a refreshed hnswlib file (the caller holds the writer lock, as `clap index`
        does at the end of a run; it waits for the graph lock up to `GRAPH_LOCK_WAIT_S`); False never
        writes; None (readers) writes only if the graph lock can be taken without waiting and no newer
        graph was saved meanwhile, and otherwise keeps the refreshed graph in memory.
        `exact_below`: stores with fewer live vectors are searched exactly and no file is touched
        (default: `EXACT_BELOW`, read at call time).
        """
        index_dir = store.index_dir
        exact_below = EXACT_BELOW if exact_below is None else exact_below
        with store.snapshot():
            uuid = store.index_uuid
            generation = store.generation
            dim = store.dim or 0
            sidecar = _read_sidecar(index_dir)
            hnsw, tried_file = None, False
            same_life = sidecar is not None and sidecar.get("index_uuid") == uuid
            if same_life and sidecar.get("generation") == generation and sidecar.get("live", 0) >= max(exact_below, 1):
                hnsw, sidecar = _load_checked(index_dir, sidecar, dim)
                tried_file = True
                if hnsw is not None and sidecar.get("index_uuid") == uuid and sidecar.get("generation") == generation:
                    return cls(index_dir, dim, generation, int(sidecar["live"]), hnsw=hnsw, action="loaded")

            live_ids = store.segment_ids()  # (N,)
            if len(live_ids) < max(exact_below, 1):
                ids, vectors = store.vectors()
                return cls(
                    index_dir, dim, generation, len(ids),
                    exact_ids=ids, exact_vectors=l2_normalize(vectors), action="exact",
                )

            if same_life and not tried_file:
                hnsw, sidecar = _load_checked(index_dir, sidecar, dim)
            if hnsw is not None and sidecar.get("index_uuid") != uuid:
                hnsw = None  # the file was replaced by one from another life of the store
            action = "rebuilt"
            if hnsw is not None:
                labels = np.asarray(hnsw.get_ids_list(), dtype=np.int64)
                to_delete = np.setdiff1d(labels, live_ids, assume_unique=True)
                to_add = np.setdiff1d(live_ids, labels, assume_unique=True)
                total = len(labels) + len(to_add)
                if len(to_delete) > REBUILD_DELETED_FRACTION * total:
                    hnsw = None
                else:
                    changed = _top_up(hnsw, store, to_add, to_delete, num_threads)
                    action = "topped_up" if changed or sidecar.get("generation") != generation else "loaded"
            if hnsw is None:
                hnsw = _build(store, dim, len(live_ids), num_threads)
                labels_total = len(live_ids)
            else:
                labels_total = hnsw.element_count
            state = {
                "format": SIDECAR_FORMAT,
                "index_uuid": uuid,
                "generation": generation,
                "max_segment_id": int(live_ids[-1]) if len(live_ids) else 0,
                "count": int(labels_total),
                "live": int(len(live_ids)),
                "deleted": int(labels_total - len(live_ids)),
                "dim": dim,
                "space": SPACE,
                "M": M,
                "ef_construction": EF_CONSTRUCTION,
            }

        persisted = False
        if action != "loaded" and persist is not False:
            persisted = _persist(index_dir, hnsw, state, take_lock=persist is None)
        return cls(index_dir, dim, generation, len(live_ids), hnsw=hnsw, action=action, persisted=persisted)

    # -- querying -------------------------------------------------------------------------------------------

    def query(self, vectors: np.ndarray, k: int, ef: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest segments to each query vector by cosine similarity.

        `vectors` is (Q, D) or (D,) (treated as Q = 1). Returns (ids (Q, k') int64, scores (Q, k')
        float32), best first, with k' = min(k, live vectors) and score = cosine similarity. Ids are
        segment ids; resolve them with `IndexStore.segment_rows`, which also drops any that the store
        deleted after this index was synced.
        """
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]  # (1, D)
        if queries.ndim != 2:
            raise ValueError(f"query vectors must be (Q, D) or (D,), got shape {queries.shape}")
        k = min(int(k), self.count)
        if k <= 0 or queries.shape[0] == 0:
            return np.empty((queries.shape[0], 0), dtype=np.int64), np.empty((queries.shape[0], 0), dtype=np.float32)
        if queries.shape[1] != self.dim:
            raise IndexStoreError(
                f"query has {queries.shape[1]} dimensions but index {self.index_dir} holds {self.dim}; "
                "search with the model the index was built with"
            )
        if self._hnsw is None:
            return self._exact_query(queries, k)
        ef = max(int(ef) if ef else max(4 * k, MIN_EF), k)
        for attempt_ef in (ef, max(ef, self.count)):
            self._hnsw.set_ef(attempt_ef)
            try:
                labels, distances = self._hnsw.knn_query(queries, k=k)  # (Q, k) each
                return labels.astype(np.int64), (1.0 - distances).astype(np.float32)
            except RuntimeError:
                continue  # too few results reachable past deleted elements: widen the beam, then go exact
        self._load_exact_from_graph()
        return self._exact_query(queries, k)

    def _exact_query(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = l2_normalize(queries) @ self._exact_vectors.T  # (Q, N)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
            np.arange(scores.shape[1]), (scores.shape[0], 1)
        )  # (Q, k) unordered
        top_scores = np.take_along_axis(scores, top, axis=1)
        top_ids = self._exact_ids[top]
        order = np.lexsort((top_ids, -top_scores), axis=1)  # by score, then id
        return np.take_along_axis(top_ids, order, axis=1), np.take_along_axis(top_scores, order, axis=1)

    def _load_exact_from_graph(self) -> None:
        if self._exact_vectors is not None:
            return
        labels = np.asarray(self._hnsw.get_ids_list(), dtype=np.int64)
        live = []
        for label in labels:  # deleted labels raise; this path is a rare fallback
            try:
                live.append((label, self._hnsw.get_items([int(label)])[0]))
            except RuntimeError:
                pass
        self._exact_ids = np.array([label for label, _ in live], dtype=np.int64)
        self._exact_vectors = l2_normalize(np.array([v for _, v in live], dtype=np.float32).reshape(-1, self.dim))


# ---------------------------------------------------------------------------------------------------------
# Building, topping up, persisting


def _new_graph(dim: int, capacity: int) -> hnswlib.Index:
    hnsw = hnswlib.Index(space=SPACE, dim=dim)
    hnsw.init_index(max_elements=max(capacity, 1), ef_construction=EF_CONSTRUCTION, M=M, random_seed=_RANDOM_SEED)
    return hnsw


def _build(store: IndexStore, dim: int, count: int, num_threads: int) -> hnswlib.Index:
    hnsw = _new_graph(dim, count)
    for ids, vectors in store.iter_vectors():
        hnsw.add_items(vectors, ids, num_threads=num_threads)
    return hnsw


def _top_up(
    hnsw: hnswlib.Index, store: IndexStore, to_add: np.ndarray, to_delete: np.ndarray, num_threads: int
) -> bool:
    """Mark gone ids deleted and add new ones; True if anything changed."""
    changed = False
    for label in to_delete:
        try:
            hnsw.mark_deleted(int(label))
            changed = True
        except RuntimeError:
            pass  # deleted by an earlier sync
    if len(to_add):
        needed = hnsw.element_count + len(to_add)
        if needed > hnsw.max_elements:
            hnsw.resize_index(max(needed, int(hnsw.max_elements * 1.5)))
        ids, vectors = store.vectors_by_id(to_add)
        hnsw.add_items(vectors, ids, num_threads=num_threads)
        changed = True
    return changed


def _persist(index_dir: Path, hnsw: hnswlib.Index, state: dict, take_lock: bool) -> bool:
    """Write the graph and its sidecar atomically under the graph lock. A reader (`take_lock`) does not
    wait for it, and writes nothing where it cannot write or where a newer graph of the store is already saved;
    the writer waits up to `GRAPH_LOCK_WAIT_S`. Returns whether the files were written."""
    if take_lock and not os.access(index_dir, os.W_OK):
        return False  # a read-only index (a read-only mount, a shared library): the refresh stays in memory
    lock = GraphLock(index_dir)
    if not lock.acquire(timeout=0 if take_lock else GRAPH_LOCK_WAIT_S):
        return False  # another process is saving the graph: keep the refreshed copy in memory
    try:
        if take_lock and _saved_is_newer(index_dir, state):
            return False
        _write_files(index_dir, hnsw, state)
        return True
    except OSError:
        if not take_lock:
            raise
        return False
    finally:
        lock.release()


def _saved_is_newer(index_dir: Path, state: dict) -> bool:
    """Whether the saved graph reflects a later commit of the same store than `state` (a `clap index` saved
    it while this reader was syncing an older snapshot)."""
    saved = _read_sidecar(index_dir) or {}
    generation = saved.get("generation")
    return saved.get("index_uuid") == state["index_uuid"] and isinstance(generation, int) \
        and generation > state["generation"]


def _write_files(index_dir: Path, hnsw: hnswlib.Index, state: dict) -> None:
    target = index_dir / ANN_FILENAME
    for name in (ANN_FILENAME, SIDECAR_FILENAME):  # left by a writer killed mid-save; we hold the graph lock
        remove_stale_temps(index_dir / name)
    atomic_write(target, writer=lambda tmp: hnsw.save_index(str(tmp)))
    st = target.stat()
    state = dict(state, file_size=st.st_size, file_mtime_ns=st.st_mtime_ns)
    write_json_atomic(index_dir / SIDECAR_FILENAME, state)


def write_json_atomic(path: Path, data: dict) -> None:
    """Replace `path` with `data` as JSON (sorted keys), atomically."""
    atomic_write(path, json.dumps(data, sort_keys=True) + "\n")


def _read_sidecar(index_dir: Path) -> dict | None:
    try:
        data = json.loads((index_dir / SIDECAR_FILENAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else None


def _load_checked(index_dir: Path, sidecar: dict, dim: int) -> tuple[hnswlib.Index | None, dict]:
    """Load the graph if it is the file the sidecar describes and was built as we build.

    Returns (graph, the sidecar it matched), or (None, sidecar) when it cannot be used. A writer may
    replace the pair between our reading the sidecar and loading the file, so a mismatch is retried
    once with the sidecar re-read.
    """
    path = index_dir / ANN_FILENAME
    for _ in range(2):
        if (sidecar.get("dim"), sidecar.get("space"), sidecar.get("M"), sidecar.get("ef_construction")) != (
            dim, SPACE, M, EF_CONSTRUCTION,
        ):
            return None, sidecar
        try:
            before = path.stat()
        except OSError:
            return None, sidecar
        if (before.st_size, before.st_mtime_ns) == (sidecar.get("file_size"), sidecar.get("file_mtime_ns")):
            hnsw = hnswlib.Index(space=SPACE, dim=dim)
            try:
                hnsw.load_index(str(path), max_elements=0)
            except (RuntimeError, MemoryError, ValueError):
                return None, sidecar
            try:
                after = path.stat()
            except OSError:
                return None, sidecar
            unchanged = (after.st_size, after.st_mtime_ns, after.st_ino) == (
                before.st_size, before.st_mtime_ns, before.st_ino,
            )
            if unchanged:
                if hnsw.element_count != sidecar.get("count"):
                    return None, sidecar
                return hnsw, sidecar
        fresh = _read_sidecar(index_dir)
        if fresh is None or fresh == sidecar:
            return None, sidecar
        sidecar = fresh
    return None, sidecar
