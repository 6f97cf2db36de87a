"""Tags stored in an index: every file of an index tagged from its stored vector, with no audio work.

Zero-shot: the stored file-level vectors (L2-normalised) × the label vectors (the label cache's prompt-ensembled
text embeddings, `tagging.cache`), softmax of the logit-scaled cosines as `clap tag` computes them; the top k
labels with their probabilities go into the index (`index.tag_store`). The set keeps its label vectors and logit
scale, so the files a later `clap index` adds are tagged with no text model at all (`tag_new_files`).

A classifier head (`clap finetune`) reads raw projection outputs, not normalised vectors: the indexer records each
stored vector's norm, so the raw output is `norm × vector` (for an unfused model's long file, whose vector is the
renormalised mean of its windows, the mean of `norm × window`). Files stored without norms (indexed before norms
were recorded, or by a sharded torchrun run) are embedded again, only those, when the caller passes `embed_raw`;
otherwise they are left untagged and listed in `TagRun.needs_audio`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from ..errors import ClapError, UsageError
from ..identity import fingerprint
from ..index.store import IndexStore
from ..index.tag_store import (TagSet, file_paths, file_vectors, save_tag_set, tag_sets, window_vectors,
                               write_tags)

CHUNK = 8192  # files scored per step: (CHUNK, D) vectors and (CHUNK, L) probabilities in memory

# Raw vectors of audio files, for those stored without norms: paths → (path, raw (D,) vector or None, error or None)
EmbedRaw = Callable[[list[str]], Iterable[tuple[str, "np.ndarray | None", "str | None"]]]


@dataclass
class TagRun:
    """What tagging an index with one set did."""

    tag_set: TagSet
    tagged: int = 0  # files whose tags were written
    embedded: int = 0  # of them, files whose audio was embedded again (stored without the norm a head needs)
    needs_audio: list[str] = field(default_factory=list)  # files left untagged: no norm stored, no `embed_raw`
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why) of files embed_raw could not embed
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"set": self.tag_set.to_dict(), "tagged": self.tagged, "embedded": self.embedded,
                "needs_audio": self.needs_audio, "failed": [{"path": p, "error": e} for p, e in self.failed],
                "seconds": round(self.seconds, 3)}


def index_fingerprint(store: IndexStore) -> str:
    """The fingerprint of the model whose vectors the index holds; ClapError for an index without one."""
    identity = store.model_identity
    if identity is None:
        raise ClapError(f"index {store.index_dir} holds no vectors yet; add files with `clap index DIR`")
    return fingerprint(identity)


def zero_shot_tag_set(store: IndexStore, text_model, labelset, templates: Sequence[str], top_k: int) -> TagSet:
    """Add (or replace) a zero-shot tag set: `text_model` (the index's model, its text half is enough) gives the
    label vectors through the label cache."""
    from ..tagging.cache import cached_label_embeddings

    model = index_fingerprint(store)
    store.check_model_identity(text_model.identity_dict, advice="drop --model to use the index's own model")
    label_vectors = cached_label_embeddings(text_model, labelset, templates)  # (L, D)
    return save_tag_set(store, model=model, kind="zero-shot", name=labelset.name, labels=labelset.labels,
                        labels_hash=labelset.content_hash, templates=list(templates), top_k=top_k,
                        label_vectors=label_vectors, logit_scale=float(text_model.logit_scale))


def classifier_tag_set(store: IndexStore, classifier, top_k: int) -> TagSet:
    """Add (or replace) a tag set scored by a classifier head (`models.classifier.Classifier`) trained on this
    index's model; UsageError for a head trained on another model."""
    from ..models.classifier import HEAD_FILE

    model = index_fingerprint(store)
    if classifier.encoder_fingerprint != model:
        raise UsageError(
            f"classifier {classifier.directory} was trained on model {classifier.encoder.get('model')!r}, not on the "
            f"model of index {store.index_dir} ({(store.model_identity or {}).get('model')!r}); tag with a head "
            "trained on the index's model")
    digest = hashlib.sha256((classifier.directory / HEAD_FILE).read_bytes())
    digest.update(json.dumps(classifier.labels, ensure_ascii=False).encode("utf-8"))
    return save_tag_set(store, model=model, kind="classifier", name=classifier.directory.name,
                        labels=classifier.labels, labels_hash=digest.hexdigest(), templates=[], top_k=top_k,
                        classifier=str(classifier.directory))


def tag_index(store: IndexStore, tag_set: TagSet, *, only_untagged: bool = False, classifier=None,
              embed_raw: EmbedRaw | None = None, on_files: Callable[[int], None] | None = None) -> TagRun:
    """Tag the searchable files of the index with `tag_set` (only those without tags in it, with `only_untagged`)
    and store their top labels, all in one transaction. `classifier`: the set's head, read from its directory when
    not given. `on_files(n)` is called as each chunk of n files is tagged."""
    started = time.perf_counter()
    run = TagRun(tag_set)
    if tag_set.kind == "classifier" and classifier is None:
        classifier = read_set_classifier(tag_set)
    scorer = classifier if tag_set.kind == "classifier" else _zero_shot_scorer(tag_set)
    missing: list[int] = []  # classifier sets: files stored without the norms of their raw vectors
    with store.transaction():
        after = 0
        while True:
            ids, vectors, norms = file_vectors(store, after, CHUNK, tag_set.id if only_untagged else None)
            if not len(ids):
                break
            after = int(ids[-1])
            if tag_set.kind == "classifier":
                vectors, known = _raw_vectors(store, ids, vectors, norms)
                missing += ids[~known].tolist()
                ids, vectors = ids[known], vectors[known]
            if len(ids):
                _write_top(store, tag_set, scorer, ids, vectors)
                run.tagged += len(ids)
            if on_files is not None:
                on_files(len(ids))
        if missing:
            _tag_from_audio(store, tag_set, scorer, missing, embed_raw, run, on_files)
    run.seconds = time.perf_counter() - started
    return run


def tag_new_files(store: IndexStore) -> list[TagRun]:
    """Tag, in every tag set of the index's model, the files that have no tags in it yet (those `clap index` has
    just added or embedded again), from their stored vectors. A set whose classifier cannot be read gives a run
    with that file in `failed`."""
    if store.model_identity is None:
        return []
    model = index_fingerprint(store)
    runs = []
    for tag_set in tag_sets(store):
        if tag_set.model != model:
            continue
        try:
            runs.append(tag_index(store, tag_set, only_untagged=True))
        except ClapError as exc:
            runs.append(TagRun(tag_set, failed=[(tag_set.classifier or tag_set.name, str(exc))]))
    return runs


def restore_tag_sets(store: IndexStore, sets: Sequence[TagSet]) -> list[TagSet]:
    """Add again the tag sets an index held before `clap index --rebuild` filled a new one, those of the new index's
    model (a rebuild with another model leaves the others out: their label vectors or heads do not fit it); their
    files are then untagged, for `tag_new_files`. Returns the sets restored."""
    if store.model_identity is None:
        return []
    model = index_fingerprint(store)
    return [save_tag_set(store, model=s.model, kind=s.kind, name=s.name, labels=s.labels, labels_hash=s.labels_hash,
                         templates=s.templates, top_k=s.top_k, label_vectors=s.label_vectors,
                         logit_scale=s.logit_scale, classifier=s.classifier)
            for s in sets if s.model == model]


def read_set_classifier(tag_set: TagSet):
    """The head of a classifier set, read again from its directory (no model is loaded)."""
    from ..models.classifier import read_classifier

    try:
        return read_classifier(tag_set.classifier)
    except UsageError as exc:
        raise ClapError(f"tag set {tag_set.id} ({tag_set.name}): {exc}") from None


def _zero_shot_scorer(tag_set: TagSet):
    from ..tagging.scoring import ZeroShotScorer

    return ZeroShotScorer(tag_set.labels, tag_set.label_vectors, tag_set.logit_scale)


def _write_top(store: IndexStore, tag_set: TagSet, scorer, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Score (n, D) vectors and store each file's top k labels by probability (ties keep label order, as `clap tag`
    orders them)."""
    probs = scorer(vectors).probs  # (n, L)
    order = np.argsort(-probs, axis=1, kind="stable")[:, : tag_set.top_k]  # (n, k)
    scores = np.take_along_axis(probs, order, axis=1)
    labels = [[tag_set.labels[j] for j in row] for row in order.tolist()]
    write_tags(store, tag_set.id, ids, labels, scores)


def _raw_vectors(store: IndexStore, ids: np.ndarray, vectors: np.ndarray,
                 norms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw vectors (n, D), known (n,) bool): `norm × vector`, or for a file stored without a file-level norm whose
    windows all have theirs (an unfused model's long file), the mean of `norm × window`; `known` is False for the
    files whose raw vector the index cannot give."""
    raw = vectors * norms[:, None].astype(np.float32)
    known = np.isfinite(norms)
    for row in np.flatnonzero(~known):
        windows, window_norms = window_vectors(store, int(ids[row]))
        if len(window_norms) and np.isfinite(window_norms).all():
            raw[row] = (windows * window_norms[:, None].astype(np.float32)).mean(axis=0)
            known[row] = True
    return raw.astype(np.float32), known


def _tag_from_audio(store, tag_set, scorer, missing: list[int], embed_raw, run: TagRun, on_files) -> None:
    """Files stored without norms: embedded again through `embed_raw` (the head's model), or listed."""
    paths = file_paths(store, missing)
    if embed_raw is None:
        run.needs_audio = sorted(paths.values())
        return
    by_path = {path: file_id for file_id, path in paths.items()}
    done_ids, done_vectors = [], []
    for path, vector, error in embed_raw(sorted(by_path)):
        if vector is None:
            run.failed.append((path, error or "cannot embed"))
            continue
        done_ids.append(by_path[path])
        done_vectors.append(np.asarray(vector, dtype=np.float32))
    if done_ids:
        _write_top(store, tag_set, scorer, np.array(done_ids, dtype=np.int64), np.stack(done_vectors))
        run.tagged += len(done_ids)
        run.embedded += len(done_ids)
        if on_files is not None:
            on_files(len(done_ids))
