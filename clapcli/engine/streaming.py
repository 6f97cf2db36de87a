"""Streaming file embedding for window models (CLAP): `embed_files` behind `Clap.embed_files`.

Files are decoded, resampled and cut into windows block by block (`clapcli.audio.stream`); the pieces are
embedded in batches as they complete and each file's result is put together from its pieces, so memory does
not grow with a file's length. `file_level` is the one rule for a file's embedding from its windows, shared
with `Clap.embed_waveforms` so both paths give the same result."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import failure_kind, first_line
from ..records import AudioEmbedding, Segment
from ..vectors import l2_normalize


@dataclass
class _StreamedFile:
    """What `embed_files` gathers for one file while its pieces stream in."""

    path: str
    vector: np.ndarray | None = None  # the file-level job's output
    norm: float | None = None  # the file-level job's raw norm (see AudioEmbedding.norm)
    windows: list[tuple[int, np.ndarray, float | None]] = field(default_factory=list)  # (start sample, vector, norm)
    pending: int = 0  # jobs queued but not run
    ended: bool = False
    end: object = None  # the "end" (or "error") piece
    error: str | None = None
    error_kind: str | None = None

    def result(self, sr: int, clip: int, segments: bool, normalize: bool) -> AudioEmbedding:
        if self.error is not None:
            return AudioEmbedding(self.path, 0.0, None, error=self.error, error_kind=self.error_kind)
        n = self.end.samples_total
        embedding, segs = file_level(self.vector, self.windows, n, sr, clip, segments, normalize)
        return AudioEmbedding(self.path, n / sr, embedding, segs, sample_rate=self.end.sample_rate,
                              channels=self.end.channels, partial=self.end.partial,
                              norm=self.norm if self.vector is not None else None)


def file_level(vector, windows, n: int, sr: int, clip: int, segments: bool, normalize: bool):
    """(file embedding, segments) of an n-sample file from its file-level vector (None: an unfused long
    file, whose embedding is the mean of its normalised windows, renormalised) and its (start, vector, raw norm)
    windows."""
    if vector is None:
        mean = np.mean([v for _, v, _ in windows], axis=0)
        vector = l2_normalize(mean) if normalize else mean.astype(np.float32)
    return vector, [Segment(s / sr, min(s + clip, n) / sr, v, norm) for s, v, norm in windows] if segments else []


def embed_failure(exc: BaseException) -> str:
    """The error recorded for a file whose forward pass failed (say, out of memory on a very long file)."""
    return f"cannot embed: {first_line(exc)}"


def embed_files(
    model,
    paths: Iterable[str | os.PathLike],
    batch_size: int,
    segments: bool,
    workers: int,
    on_error: Callable[[str, str], None] | None,
    normalize: bool,
    on_audio: Callable[[str, float, float], None] | None,
) -> Iterator[AudioEmbedding]:
    """`Clap.embed_files` (see there) for a window model: `model` is the `Clap`, whose `_run_jobs` embeds each
    batch of pieces."""
    from ..audio.decode import _log_messages
    from ..audio.stream import FusionStack, StreamOptions, iter_pieces

    fe = model.config.frontend
    sr, clip = fe.sample_rate, fe.clip_samples
    opts = StreamOptions(sr, fe.quantize_int16, clip, windows=segments or not model.fused, fusion=model.fused,
                         frontend=fe)
    paths = [os.fspath(p) for p in paths]
    files: dict[int, _StreamedFile] = {}
    jobs: list[tuple[int, object, object, None]] = []
    next_out = 0

    def run(batch: list) -> None:
        norms: list[float | None] = []
        try:
            vectors = model._run_jobs(batch, len(batch), normalize, norms if normalize else None)
        except (RuntimeError, ValueError, MemoryError) as exc:
            if len(batch) > 1:  # find the file at fault, keep the rest
                for job in batch:
                    run([job])
                return
            state = files[batch[0][0]]
            if state.error is None:
                state.error, state.error_kind = embed_failure(exc), failure_kind(exc)
            vectors = [None]
        norms = norms or [None] * len(vectors)
        for (i, kind, _, _), vec, norm in zip(batch, vectors, norms):
            state = files[i]
            state.pending -= 1
            if vec is None:
                continue
            if kind == "file":
                state.vector, state.norm = vec, norm
            else:
                state.windows.append((kind, vec, norm))

    def finished() -> Iterator[AudioEmbedding]:
        nonlocal next_out
        while next_out in files and files[next_out].ended and files[next_out].pending == 0:
            result = files.pop(next_out).result(sr, clip, segments, normalize)
            if result.error is not None and on_error:
                on_error(result.path, result.error)
            next_out += 1
            yield result

    for piece in iter_pieces(paths, opts, workers, frontend=model.features.frontend if model.fused else None):
        state = files.setdefault(piece.index, _StreamedFile(piece.path))
        payload = None
        if piece.kind in ("clip", "window"):
            payload = piece.samples
        elif piece.kind == "fusion":
            payload = FusionStack(piece.features, piece.longer)
        elif piece.kind in ("end", "error"):
            state.ended, state.end = True, piece
            if state.error is None:
                state.error, state.error_kind = piece.error, piece.error_kind
            _log_messages(piece.path, piece.messages)
        if payload is not None:
            jobs.append((piece.index, "file" if piece.kind != "window" else piece.start, payload, None))
            state.pending += 1
        if on_audio and piece.seconds:
            on_audio(piece.path, piece.seconds, piece.expected_seconds)
        if len(jobs) >= batch_size:
            batch, jobs = jobs[:batch_size], jobs[batch_size:]
            run(batch)
        yield from finished()
    if jobs:
        run(jobs)
        jobs = []
    yield from finished()
