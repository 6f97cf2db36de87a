"""What `clap serve` reads from its index: status, searches, "more like this", tags, file rows, the map's vectors.

One `IndexReader` per server, over one read-only `IndexStore` and the `Searcher` of `clap search`, which syncs its
nearest-neighbour graph again when the store's generation moves (a `clap index` committed meanwhile). SQLite
connections belong to the thread that opened them, so the app calls every method here from one thread of its
own (`app.py`); the store is opened there on first use.

Hits carry the keys of `clap search --json` and what the page shows beside them (see `hit_dict`): the file's
index id, name, folder, format, its cosine with every stored window, and its top labels from the served label
set, scored from the stored file vector against the cached label embeddings (no audio is embedded again).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from ..errors import IndexStoreError, UsageError
from ..identity import same_model
from ..index.lock import lock_holder_pid
from ..index.lookup import StoredFile, stored_file
from ..index.paths import check_remembered_model, folder_in_index
from ..index.query import Query, read_query, text_query_model
from ..index.rows import FileRecord
from ..index.search import Hit, Searcher, moved_model_advice, open_for_search, query_vector
from ..index.store import IndexStore
from ..tagging.cache import cached_label_embeddings
from ..tagging.labels import LabelSet, resolve_labels
from ..vectors import l2_normalize
from ..version import __version__

DEFAULT_LABELS = "audioset"  # the most general built-in set: 527 everyday sound classes
TAGS_PER_HIT = 5
SEARCHABLE = ("ok", "partial")


# What browsers play as they are (served as the file itself); `/api/audio/N` sends any other format as a WAV made
# on the fly (playback.py), and each hit says which (`mime`, `transcoded`), so the page names a dragged file right.
BROWSER_TYPES = {"wav": "audio/wav", "wave": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "ogg": "audio/ogg", "oga": "audio/ogg", "opus": "audio/ogg", "m4a": "audio/mp4"}


class NotFound(UsageError):
    """A file id (or another thing a request names) that the index does not hold: HTTP 404."""


class IndexReader:
    """The index as `clap serve` answers from it: every method runs on the app's index thread (see module doc)."""

    def __init__(self, index_dir: str | os.PathLike, labels: str = DEFAULT_LABELS):
        self.index_dir = Path(index_dir)
        self.labelset: LabelSet = resolve_labels(labels)
        open_for_search(self.index_dir).close()  # a missing or empty index fails here, before the server starts
        self._store: IndexStore | None = None
        self._searcher: Searcher | None = None
        self._text_model = None
        self._audio_model = None
        self._audio_lock = threading.Lock()  # the audio model loads in a worker thread, once
        self._label_emb: np.ndarray | None = None  # (L, D), L2-normalised

    # -- the store and the models ------------------------------------------------------------------------

    @property
    def store(self) -> IndexStore:
        if self._store is None:
            self._store = IndexStore.open(self.index_dir, readonly=True)
            self._searcher = Searcher(self._store, persist=False)  # the server never writes the index
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def model_ref(self) -> str | None:
        return (self.store.model_identity or {}).get("model")

    def text_model(self):
        """The saved torch-free query graph where it answers exactly as the index's model, else the model's text
        half; loaded once."""
        if self._text_model is None:
            identity = self.store.model_identity or {}
            ref = identity.get("model")
            check_remembered_model(ref, self.index_dir, moved_model_advice(str(self.index_dir)))
            model = text_query_model(ref, identity)
            self._check(model)
            self._text_model = model
        return self._text_model

    def identity(self) -> dict:
        """The index's model identity, checked to still be where it was (for `audio_model`, off this thread)."""
        identity = self.store.model_identity or {}
        check_remembered_model(identity.get("model"), self.index_dir, moved_model_advice(str(self.index_dir)))
        return identity

    def audio_model(self, identity: dict):
        """The index's whole model, for queries by an uploaded example: loaded on the first such query only.
        Called from a worker thread (embedding an upload must not hold up searches), so it takes no store."""
        with self._audio_lock:
            if self._audio_model is None:
                from ..engine.load import load_model

                model = load_model(identity.get("model"))
                if identity and not same_model(identity, model.identity_dict):
                    raise IndexStoreError(f"the model at {identity.get('model')} is no longer the one this index "
                                          "was built with; restore it or rebuild the index")
                self._audio_model = model
        return self._audio_model

    def _check(self, model) -> None:
        self.store.check_model_identity(model.identity_dict, advice="restore the model it was built with, or rebuild "
                                        f"the index: `clap index DIR… --index {self.index_dir} --rebuild`")

    def label_embeddings(self) -> np.ndarray:
        if self._label_emb is None:
            self._label_emb = l2_normalize(cached_label_embeddings(self.text_model(), self.labelset, None))
        return self._label_emb

    # -- answers ------------------------------------------------------------------------------------------

    def status(self) -> dict:
        store = self.store
        with store.snapshot():
            counts = store.counts()
            updated = store.get_meta("updated_at")
            return {
                "index": self.index_dir.name, "path": str(self.index_dir), "model": self.model_ref,
                "files": counts.ok_files, "segments": counts.segments,
                "updated_at": None if updated is None else round(float(updated), 3),
                "generation": store.generation, "writing": writer_active(self.index_dir),
                "labels": self.labelset.name, "version": __version__,
            }

    def search_text(self, text: str, k: int) -> dict:
        """`q` read as `clap search` reads its words (split on spaces; `+` and `-` join queries)."""
        read = read_query(text.split(), [], [])
        if read.audio or read.not_audio:  # a path typed into the box is a file on the server's disk: not for a
            # browser to name, so it is read as words
            read = Query(text=read.text + read.audio, negative=read.negative + read.not_audio)
        if not read.text:
            raise UsageError("nothing to search for: give words (a `- term` alone pushes away from nothing)")
        query = query_vector(self.text_model(), read.text, read.negative, cache=True)
        return self.search_vector(query, k, read.to_dict())

    def search_vector(self, query: np.ndarray, k: int, read: dict, leave_out: int | None = None) -> dict:
        store = self.store
        with store.snapshot():
            left = None if leave_out is None else store.file_record(file_id=leave_out)
            hits = self._searcher.search(query, k=k, exclude=() if left is None else (left.path,))
            roots = store.roots()
            return {"query": read, "hits": [self.hit_dict(h, query, read, roots) for h in hits]}

    def similar(self, file_id: int, k: int) -> dict:
        """Files like file `file_id`, from its stored vector (no model work), itself left out."""
        stored = self.stored(file_id)
        read = {"text": [], "not": [], "audio": [stored.record.path], "id": file_id}
        return self.search_vector(stored.vector, k, read, leave_out=file_id)

    def stored(self, file_id: int) -> StoredFile:
        found = stored_file(self.store, file_id=file_id, require_unchanged=False)
        if found is None:
            raise NotFound(f"no file with id {file_id} in this index")
        return found

    def file(self, file_id: int) -> tuple[FileRecord, list[str]]:
        """The row of a searchable file and the index's roots; NotFound for any other id."""
        record = self.store.file_record(file_id=file_id)
        if record is None or record.status not in SEARCHABLE:
            raise NotFound(f"no file with id {file_id} in this index")
        return record, self.store.roots()

    def tags(self, file_id: int) -> dict:
        return {"id": file_id, "tags": self.top_labels(self.stored(file_id).vector)}

    def top_labels(self, vector: np.ndarray, top: int = TAGS_PER_HIT) -> list[dict]:
        """The labels of the served set nearest to a stored vector, best first, scored by their cosine."""
        cosine = self.label_embeddings() @ vector  # (L,)
        best = np.argsort(-cosine, kind="stable")[:top]
        return [{"label": self.labelset.labels[i], "score": round(float(cosine[i]), 4)} for i in best]

    def hit_dict(self, hit: Hit, query: np.ndarray, read: dict, roots: list[str]) -> dict:
        out = {**hit.to_dict(), "query": read}
        record = self.store.file_record(hit.path)
        stored = None if record is None else stored_file(self.store, file_id=record.id, require_unchanged=False)
        name = os.path.basename(hit.path)
        ext = os.path.splitext(name)[1][1:].lower()
        out.update({
            "id": None if record is None else record.id, "name": name, "folder": folder_in_index(hit.path, roots),
            "format": ext, "mime": BROWSER_TYPES.get(ext, "audio/wav"), "transcoded": ext not in BROWSER_TYPES,
            "sample_rate": None if record is None else record.sample_rate,
            "channels": None if record is None else record.channels,
            "windows": [] if stored is None else [
                [round(w.start, 3), round(w.end, 3), round(float(c), 6)]
                for w, c in zip(stored.windows, stored.window_vectors @ query)],
            "tags": [] if stored is None else self.top_labels(stored.vector),
        })
        return out


def writer_active(index_dir: str | os.PathLike) -> bool:
    """Whether a `clap index` holds the writer lock now, asked without taking it: the holder names itself in the
    lock's sidecar while it holds the lock (a sidecar left by a killed writer names a pid that is gone)."""
    pid = lock_holder_pid(index_dir)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
