"""Decoding many files in DataLoader workers gives the same results, in the same order, as inline."""

from __future__ import annotations

import numpy as np

from audio_synth import tone_noise, write_audio
from clapcli.audio.loader import MIN_FILES_FOR_WORKERS, iter_decoded


def test_workers_decode_like_the_main_process_in_order(tmp_path):
    paths = []
    for i in range(MIN_FILES_FOR_WORKERS + 3):
        sr = (22_050, 44_100, 48_000)[i % 3]
        paths.append(write_audio(tmp_path / f"{i:02d}.flac", tone_noise(0.2 + 0.01 * i, sr, seed=i), sr))
    bad = tmp_path / "zz_bad.wav"
    bad.write_text("not audio")
    paths.insert(5, str(bad))
    inline = list(iter_decoded(paths, 48_000, workers=0))
    pooled = list(iter_decoded(paths, 48_000, workers=2))
    assert [d.path for d in pooled] == paths == [d.path for d in inline]
    assert pooled[5].error and pooled[5].samples is None
    for a, b in zip(inline, pooled):
        assert (a.error is None) == (b.error is None)
        if a.error is None:
            assert a.sample_rate == b.sample_rate and np.array_equal(a.samples, b.samples)
