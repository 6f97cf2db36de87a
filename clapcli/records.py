"""Plain record types that several floors pass around: what the engine returns for a file (`AudioEmbedding`,
its `Segment`s), what a tagging scorer returns (`Scores`). Numpy only; no behaviour beyond reading fields."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Segment:
    start: float  # seconds
    end: float  # seconds
    embedding: np.ndarray  # (D,) L2-normalised
    norm: float | None = None  # L2 norm of the raw projection output `embedding` is the normalised form of


@dataclass
class AudioEmbedding:
    path: str | None
    duration: float  # seconds
    embedding: np.ndarray | None  # (D,) L2-normalised file-level embedding; None on error
    segments: list[Segment] = field(default_factory=list)  # 10 s windows of files longer than 10 s (Wav2CLIP: 1 s)
    error: str | None = None
    sample_rate: int | None = None  # of the source file
    channels: int | None = None  # of the source file
    partial: str | None = None  # why only part of the file could be decoded (what decoded was embedded)
    error_kind: str | None = None  # with `error`: DATA_FAILURE or ENVIRONMENT_FAILURE (errors.failure_kind)
    # L2 norm of the raw projection output `embedding` is the normalised form of, so that norm × embedding is what a
    # head on raw projections reads; None where there is no such output (an unfused long file's embedding is the
    # renormalised mean of its windows: their norms give its raw form) or `normalize=False` was asked
    norm: float | None = None


@dataclass(frozen=True)
class Scores:
    """A scorer's output for N audio embeddings and L labels (see `clapcli.tagging.scoring`)."""

    probs: np.ndarray  # (N, L) per-clip distribution over labels; rows sum to 1
    cosine: np.ndarray | None  # (N, L) audio-label cosine similarity; None for scorers without a joint space

    @property
    def independent(self) -> np.ndarray:
        """(N, L) the per-label score that multi-label thresholds compare against."""
        return self.cosine if self.cosine is not None else self.probs
