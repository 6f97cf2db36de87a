"""Replay the random fusion crops of transformers' `ClapFeatureExtractor`, so our deterministic front end
can be fed the very crops the reference drew and the two compared exactly.

In `truncation="fusion"` mode the extractor's `_random_mel_fusion` picks, for each clip longer than 10 s,
one 1001-frame crop start in each third of the possible range with `np.random.choice`, clip by clip in
batch order, from numpy's global RNG. After `np.random.seed(seed)` the same calls on a fresh
`np.random.RandomState(seed)` draw the same numbers, so `replay_hf_fusion_crops(lengths, seed)` gives
those starts without touching the global RNG. (The extractor's "force one clip onto the fusion path" rule
draws after every clip is cropped, so it does not shift these draws.)

Tests import it as `hf_replay` (pytest's `pythonpath`), the benchmarks as `tests.hf_replay`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

HOP = 480  # samples per mel frame at 48 kHz
CLIP_SAMPLES = 480_000  # 10 s at 48 kHz: the extractor's max_length
CHUNK_FRAMES = CLIP_SAMPLES // HOP + 1  # 1001 frames in one 10 s crop

CropStarts = tuple[int, int, int]  # (front, middle, back) crop start frames


def replay_hf_fusion_crops(sample_counts: Sequence[int], seed: int) -> list[CropStarts | None]:
    """The crop starts `ClapFeatureExtractor(truncation="fusion")` drew for clips of these lengths (48 kHz
    samples, in batch order) after `np.random.seed(seed)`; None for a clip it did not crop (≤ 10 s, or
    exactly 1001 frames long, which it stacks four times)."""
    rng = np.random.RandomState(seed)
    crops: list[CropStarts | None] = []
    for n in sample_counts:
        total = n // HOP + 1  # frames of the centred STFT of the whole clip
        if n <= CLIP_SAMPLES or total == CHUNK_FRAMES:
            crops.append(None)
            continue
        ranges = np.array_split(list(range(0, total - CHUNK_FRAMES + 1)), 3)
        ranges = [r if len(r) else [0] for r in ranges]
        crops.append(tuple(int(rng.choice(r)) for r in ranges))
    return crops
