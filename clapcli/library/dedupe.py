"""Duplicate recordings in an index: groups of files that hold the same sound, each with a suggested keeper.

1. Candidates: every indexed file's stored file-level vector is looked up among its `k` nearest neighbours in
   the index's hnswlib graph (`AnnIndex`, the one `clap search` uses: never all pairs); a neighbour that is
   another file's file-level vector with cosine ≥ `threshold` makes a candidate pair.
2. Check: each candidate pair is decoded and compared by `audio_match.match` (the rule is in that module): same
   recording, or only a similar sound. Pairs already joined through others are not checked again.
3. Groups: union-find over the pairs that pass. Files missing on disk or that no longer decode are reported
   (`Duplicates.missing`, `.unreadable`), never grouped.
4. Keeper: lossless before lossy, then the higher sample rate, the higher bit depth, the longer file (then
   the first path), with a sentence saying why. Nothing is deleted or moved: this module only reads.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import AudioDecodeError
from ..index.ann import AnnIndex
from ..index.store import IndexStore
from ..vectors import l2_normalize
from .audio_match import Fingerprint, fingerprint, match

DEFAULT_THRESHOLD = 0.9  # cosine of file vectors from which two files are checked (benchmarks/RESULTS.md)
DEFAULT_K = 10  # nearest neighbours looked at per file
QUERY_BATCH = 4096  # file vectors per hnswlib query
FINGERPRINT_CACHE_BYTES = 256 << 20  # decoded audio (8 kHz float32: 32 kB a second) kept between pair checks

# libsndfile subtypes whose encoding throws information away (everything else is lossless PCM/FLAC/ALAC)
LOSSY_SUBTYPES = {"VORBIS", "OPUS", "MPEG_LAYER_I", "MPEG_LAYER_II", "MPEG_LAYER_III", "GSM610", "IMA_ADPCM",
                  "MS_ADPCM", "VOX_ADPCM", "G721_32", "G723_24", "G723_40", "NMS_ADPCM_16", "NMS_ADPCM_24",
                  "NMS_ADPCM_32", "ULAW", "ALAW", "DWVW_12", "DWVW_16", "DWVW_24", "DPCM_8", "DPCM_16"}
_BIT_DEPTHS = {"PCM_S8": 8, "PCM_U8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64,
               "ALAC_16": 16, "ALAC_20": 20, "ALAC_24": 24, "ALAC_32": 32}

Progress = Callable[[int, int], None]  # (pairs checked, pairs to check)


@dataclass(frozen=True)
class AudioFacts:
    """What the keeper choice reads of a file, as decoded now."""

    path: str
    format: str  # libsndfile's name of the container: WAV, FLAC, OGG, MP3, AIFF, ...
    sample_rate: int  # Hz
    bit_depth: int | None  # bits per sample of lossless audio; None for lossy codecs
    channels: int
    duration: float  # seconds
    lossless: bool

    @classmethod
    def of(cls, path: str, fp: Fingerprint) -> "AudioFacts":
        lossless = fp.subtype not in LOSSY_SUBTYPES
        return cls(path, fp.info.format, fp.info.sample_rate, _BIT_DEPTHS.get(fp.subtype) if lossless else None,
                   fp.info.channels, float(fp.info.duration), lossless)

    def rank(self) -> tuple:
        """Sort key, best keeper first."""
        return (not self.lossless, -self.sample_rate, -(self.bit_depth or 0), -self.duration, self.path)

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "sample_rate": self.sample_rate,
                "bit_depth": self.bit_depth, "channels": self.channels, "duration": round(self.duration, 3)}


@dataclass
class Duplicate:
    facts: AudioFacts
    similarity: float  # audio-match score against the keeper (mean spectral coherence, 0…1)
    cosine: float  # cosine of the two files' stored vectors

    def to_dict(self) -> dict:
        return {**self.facts.to_dict(), "similarity": round(self.similarity, 4), "cosine": round(self.cosine, 4)}


@dataclass
class DuplicateGroup:
    keeper: AudioFacts
    why: str  # the reason the keeper comes first
    duplicates: list[Duplicate]  # the other copies, best first
    score: float  # the lowest similarity of a duplicate to the keeper

    def to_dict(self) -> dict:
        return {"keeper": self.keeper.to_dict(), "why": self.why,
                "duplicates": [d.to_dict() for d in self.duplicates], "score": round(self.score, 4)}


class Duplicates(list):
    """The groups found (a list of DuplicateGroup, largest first), and what could not be looked at."""

    def __init__(self, groups=(), missing=(), unreadable=(), candidates: int = 0, checked: int = 0):
        super().__init__(groups)
        self.missing: list[str] = list(missing)  # indexed files no longer on disk
        self.unreadable: list[tuple[str, str]] = list(unreadable)  # (path, reason) of files that did not decode
        self.candidates = candidates  # pairs whose vectors passed the threshold
        self.checked = checked  # pairs decoded and compared


def find_duplicates(store: IndexStore, threshold: float = DEFAULT_THRESHOLD, k: int = DEFAULT_K,
                    progress: Progress | None = None) -> Duplicates:
    """Groups of files in `store` that hold the same recording (see the module docstring). Read-only."""
    with store.snapshot():  # the vectors and the graph of one committed state
        rows = store.segment_rows(store.segment_ids())
        file_segments = {r.segment_id: r.path for r in rows if r.kind == "file"}
        ids, vectors = store.vectors_by_id(file_segments)
        ann = AnnIndex.sync(store, persist=None) if len(ids) > 1 else None
    paths = [file_segments[int(i)] for i in ids]
    vectors = l2_normalize(vectors)  # (N, D)
    pairs = _candidate_pairs(ann, ids, vectors, threshold, k) if ann is not None else {}
    return _check_and_group(paths, vectors, pairs, progress)


def _candidate_pairs(ann: AnnIndex, ids: np.ndarray, vectors: np.ndarray, threshold: float,
                     k: int) -> dict[tuple[int, int], float]:
    """(i, j) with i < j (positions in `ids`, the files' file-level segment ids) → cosine, for the files among
    each other's k nearest files with cosine ≥ threshold."""
    position = {int(seg_id): i for i, seg_id in enumerate(ids.tolist())}
    # windows of long files are in the graph too: ask for more neighbours where they are
    fetch = min(ann.count, (k + 1) * max(1, round(ann.count / len(ids))))
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), QUERY_BATCH):
        hits, scores = ann.query(vectors[start:start + QUERY_BATCH], fetch)  # (Q, fetch) each
        for row, (hit_ids, hit_scores) in enumerate(zip(hits.tolist(), scores.tolist())):
            i, found = start + row, 0
            for seg_id, score in zip(hit_ids, hit_scores):
                j = position.get(seg_id)
                if j is None or j == i:  # a window, or the file itself
                    continue
                found += 1
                if found > k or score < threshold:
                    break
                pair = (min(i, j), max(i, j))
                pairs[pair] = max(score, pairs.get(pair, -1.0))
    return pairs


def _check_and_group(paths: list[str], vectors: np.ndarray, pairs: dict[tuple[int, int], float],
                     progress: Progress | None) -> Duplicates:
    parent = list(range(len(paths)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    cache: OrderedDict[int, Fingerprint] = OrderedDict()
    facts: dict[int, AudioFacts] = {}
    missing: set[int] = set()
    unreadable: dict[int, str] = {}

    def load(i: int) -> Fingerprint | None:
        if i in cache:
            cache.move_to_end(i)
            return cache[i]
        if i in missing or i in unreadable:
            return None
        if not os.path.isfile(paths[i]):
            missing.add(i)
            return None
        try:
            fp = fingerprint(paths[i])
        except AudioDecodeError as exc:
            unreadable[i] = exc.reason
            return None
        cache[i] = fp
        facts[i] = AudioFacts.of(paths[i], fp)
        while len(cache) > 2 and sum(f.samples.nbytes for f in cache.values()) > FINGERPRINT_CACHE_BYTES:
            cache.popitem(last=False)  # the least recently used; the pair in hand stays
        return fp

    scores: dict[tuple[int, int], float] = {}
    order = sorted(pairs)  # by first file: neighbouring checks reuse its decoded audio
    checked = 0
    for done, (i, j) in enumerate(order, 1):
        if root(i) != root(j):
            a, b = load(i), load(j)
            if a is not None and b is not None:
                checked += 1
                result = match(a, b)
                scores[(i, j)] = result.score
                if result.same:
                    parent[root(j)] = root(i)
        if progress is not None:
            progress(done, len(order))

    members: dict[int, list[int]] = {}  # union-find root → the files checked into its group
    for m in sorted({m for pair in scores for m in pair}):
        members.setdefault(root(m), []).append(m)
    groups = []
    for group in members.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda m: facts[m].rank())
        keeper, others = group[0], group[1:]
        duplicates = []
        for m in others:
            pair = (min(keeper, m), max(keeper, m))
            if pair not in scores:  # joined through another copy: compare with the keeper for the report
                a, b = load(keeper), load(m)
                scores[pair] = match(a, b).score if a is not None and b is not None else 0.0
            cosine = float(vectors[keeper] @ vectors[m])
            duplicates.append(Duplicate(facts[m], scores[pair], cosine))
        duplicates.sort(key=lambda d: (-d.similarity, d.facts.path))
        groups.append(DuplicateGroup(facts[keeper], why_keeper(facts[keeper], [facts[m] for m in others]),
                                     duplicates, min(d.similarity for d in duplicates)))
    groups.sort(key=lambda g: (-len(g.duplicates), g.keeper.path))
    return Duplicates(groups, sorted(paths[i] for i in missing), sorted((paths[i], r) for i, r in unreadable.items()),
                      candidates=len(pairs), checked=checked)


def why_keeper(keeper: AudioFacts, others: list[AudioFacts]) -> str:
    """Why `keeper` comes before `others`, criterion by criterion as far as it decides."""
    reasons = []
    if keeper.lossless and any(not o.lossless for o in others):
        lossy = sorted({o.format for o in others if not o.lossless})
        reasons.append(f"lossless {keeper.format} (the others include lossy {', '.join(lossy)})")
    rivals = [o for o in others if o.lossless == keeper.lossless]
    if rivals and keeper.sample_rate > min(o.sample_rate for o in rivals):
        reasons.append(f"higher sample rate ({keeper.sample_rate} Hz)")
    rivals = [o for o in rivals if o.sample_rate == keeper.sample_rate]
    if rivals and (keeper.bit_depth or 0) > min(o.bit_depth or 0 for o in rivals):
        reasons.append(f"higher bit depth ({keeper.bit_depth}-bit)")
    rivals = [o for o in rivals if (o.bit_depth or 0) == (keeper.bit_depth or 0)]
    if rivals and keeper.duration > min(o.duration for o in rivals) + 1e-3:
        reasons.append(f"longer ({keeper.duration:.2f} s)")
    if not reasons:
        return "all copies alike in format, sample rate, bit depth and length: the first by path"
    return "; ".join(reasons)
