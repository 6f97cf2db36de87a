"""Long files in bounded memory: the streamed path (clapcli.audio.stream) equals the whole-file path.

Each stage against its whole-signal reference (resampling, log-mel, the fusion squeeze), then whole files
through `Clap.embed_files` against `Clap.embed_waveforms` of the fully decoded file, for fused and unfused
tiny models, WAV and FLAC at source rates other than 48 kHz, inline and in decode workers; then memory
(numpy allocations stay far below one decoded copy of the file) and progress within a long file.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from audio_synth import tone_noise, write_audio
from clapcli import load_model
from clapcli.audio import stream
from clapcli.audio.decode import load_audio
from clapcli.audio.features import build_fusion_input
from clapcli.audio.frontend import MelFrontEnd
from clapcli.audio.stream import FusionCollector, StreamingMel, StreamResampler, resize_combine, resize_rows
from clapcli.audio.config import FrontEndConfig


def _feed_in_random_blocks(x, feed, rng):
    out, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 60_000))
        out.append(feed(x[i : i + n]))
        i += n
    return out


@pytest.mark.parametrize("sr", [44_100, 22_050, 16_000, 96_000, 11_025])
def test_streamed_resampling_equals_torchaudio_on_the_whole_signal(sr):
    rng = np.random.default_rng(sr)
    x = (rng.standard_normal(3 * sr + int(rng.integers(0, 997))) * 0.3).astype(np.float32)
    whole = AF.resample(torch.from_numpy(x), sr, 48_000).numpy()
    r = StreamResampler(sr, 48_000)
    got = np.concatenate(_feed_in_random_blocks(x, r.feed, rng) + [r.finish()])
    assert got.shape == whole.shape
    assert np.abs(got - whole).max() < 1e-6


@pytest.mark.parametrize("scale", ["htk", "slaney"])
@pytest.mark.parametrize("n", [480_001, 480_479, 480_480, 733_333])
def test_streamed_mel_and_fusion_stack_equal_the_whole_file_ones(n, scale):
    rng = np.random.default_rng(n)
    fe = MelFrontEnd(FrontEndConfig(mel_scale=scale))
    x = (rng.standard_normal(n) * 0.2).astype(np.float32)
    whole = fe(torch.from_numpy(x)[None])[0]  # (T, 64)
    mel, fusion = StreamingMel(fe), FusionCollector(n // 480 + 1, 1001, 64)
    rows = []
    for t0, r in _feed_in_random_blocks(x, mel.feed, rng) + [mel.finish()]:
        fusion.offer(t0, r)
        rows.append(r)
    assert torch.equal(torch.cat(rows), whole)
    expected, longer = build_fusion_input(whole)
    got, got_longer = fusion.features()
    assert got_longer == longer == (n // 480 + 1 > 1001)
    assert torch.equal(got, expected)


def test_progressive_squeeze_equals_interpolate_for_any_length():
    gen = torch.Generator().manual_seed(0)
    for total in [*range(1002, 1040), 3003, 7919, 100_001]:
        mel = torch.randn(total, 64, generator=gen).cumsum(0)  # smooth, like a spectrogram over time
        ref = torch.nn.functional.interpolate(mel[None, None], size=(1001, 64), mode="bilinear",
                                              align_corners=False)[0, 0]
        i0, i1, w0, w1 = resize_rows(total, 1001)
        assert torch.allclose(resize_combine(mel[i0], mel[i1], w0, w1), ref, rtol=1e-6, atol=1e-4), total


@pytest.fixture(scope="module")
def long_files(tmp_path_factory):
    """A 35 s 44.1 kHz stereo WAV and a 27.3 s 22.05 kHz FLAC: windows, a ragged last window, resampling."""
    d = tmp_path_factory.mktemp("long")
    wav = write_audio(d / "long.wav", tone_noise(35.0, 44_100, channels=2, seed=3), 44_100, subtype="PCM_16")
    flac = write_audio(d / "long.flac", tone_noise(27.3, 22_050, seed=4), 22_050)
    short = write_audio(d / "short.wav", tone_noise(4.0, 32_000, seed=5), 32_000)
    return [wav, flac, short]


def _check_equal(streamed, whole):
    assert streamed.error is None and streamed.partial is None
    assert streamed.duration == pytest.approx(whole.duration, abs=1e-9)
    assert np.allclose(streamed.embedding, whole.embedding, atol=2e-5)
    assert [(s.start, s.end) for s in streamed.segments] == [(s.start, s.end) for s in whole.segments]
    for a, b in zip(streamed.segments, whole.segments):
        assert np.allclose(a.embedding, b.embedding, atol=2e-5)


@pytest.mark.parametrize("which", ["fused", "unfused"])
def test_long_files_stream_to_the_whole_file_embeddings(which, long_files, tiny_model_dir, tiny_unfused_dir,
                                                        monkeypatch):
    monkeypatch.setattr(stream, "BLOCK_SECONDS", 3.7)  # many blocks, none aligned to a window
    m = load_model(tiny_model_dir if which == "fused" else tiny_unfused_dir, device="cpu")
    streamed = list(m.embed_files(long_files, batch_size=4, segments=True))
    for path, got in zip(long_files, streamed):
        whole = m.embed_waveforms([load_audio(path)], segments=True)[0]
        _check_equal(got, whole)
    assert len(streamed[0].segments) == 4 and len(streamed[2].segments) == 0
    # without segments an unfused model still averages its windows; a fused one runs the fusion pass only
    plain = list(m.embed_files(long_files[:2], batch_size=3, segments=False))
    for a, b in zip(plain, streamed):
        assert not a.segments and np.allclose(a.embedding, b.embedding, atol=2e-5)


def test_decode_workers_stream_like_the_main_process(long_files, tiny_model_dir, monkeypatch):
    import clapcli.audio.loader as loader

    monkeypatch.setattr(loader, "MIN_FILES_FOR_WORKERS", 1)
    m = load_model(tiny_model_dir, device="cpu")
    paths = long_files + long_files[1::-1]
    inline = list(m.embed_files(paths, batch_size=4, workers=0))
    pooled = list(m.embed_files(paths, batch_size=4, workers=2))
    assert [r.path for r in pooled] == paths
    for a, b in zip(pooled, inline):
        _check_equal(a, b)


def _peak_and_progress(m, path):
    reports: list[tuple[str, float, float]] = []
    tracemalloc.start()
    try:
        (result,) = m.embed_files([path], batch_size=4, segments=True,
                                  on_audio=lambda p, s, e: reports.append((p, s, e)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak, reports


def test_a_long_file_is_embedded_in_bounded_memory_with_progress_inside_it(tmp_path, tiny_unfused_dir):
    """Four times the audio takes about the same memory (numpy allocations, as tracemalloc sees them; the
    whole-file path holds the decoded file twice over), and audio seconds are reported as a file goes."""
    m = load_model(tiny_unfused_dir, device="cpu")
    piece = tone_noise(20.0, 44_100, seed=6)
    peaks = {}
    for repeats in (3, 12):
        path = tmp_path / f"{repeats}.wav"
        write_audio(path, np.tile(piece, repeats), 44_100, subtype="PCM_16")
        result, peaks[repeats], reports = _peak_and_progress(m, path)
        seconds = 20.0 * repeats
        assert result.error is None and result.duration == pytest.approx(seconds)
        assert len(result.segments) == 2 * repeats
        assert len(reports) >= 2 * repeats - 1  # moves within the file, window by window
        assert sum(s for _, s, _ in reports) == pytest.approx(seconds)
        assert all(p == str(path) and e == pytest.approx(seconds) for p, _, e in reports)
    whole_file = 240.0 * 48_000 * 4  # bytes of the decoded 4-minute file at 48 kHz
    assert peaks[12] < 1.25 * peaks[3] + 4e6 and peaks[12] < 0.5 * whole_file, peaks


def test_index_progress_moves_inside_a_long_file_before_it_is_committed(tmp_path, tiny_unfused_dir):
    from clapcli.index.indexer import build_index

    root = tmp_path / "lib"
    root.mkdir()
    write_audio(root / "a_long.wav", np.tile(tone_noise(20.0, 44_100, seed=8), 3), 44_100, subtype="PCM_16")
    write_audio(root / "b_short.wav", tone_noise(2.0, 44_100, seed=9), 44_100)
    events: list[tuple] = []
    m = load_model(tiny_unfused_dir, device="cpu")
    summary = build_index([root], tmp_path / "idx", lambda name: m, batch_size=2,
                          on_audio=lambda p, s, e: events.append(("audio", p.rsplit("/", 1)[-1], s, e)),
                          on_file=lambda r: events.append(("file", r.path.rsplit("/", 1)[-1])))
    assert summary.added == 2 and summary.audio_seconds == pytest.approx(62.0)
    long_audio = [e for e in events if e[:2] == ("audio", "a_long.wav")]
    first_file = events.index(("file", "a_long.wav"))
    assert len(long_audio) >= 5 and all(events.index(e) < first_file for e in long_audio)
    assert sum(e[2] for e in long_audio) == pytest.approx(60.0) and long_audio[0][3] == pytest.approx(60.0)
