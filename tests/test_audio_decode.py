"""Decoding: formats, rates, channel counts, downmix, resampling, int16 quantisation and broken files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from audio_synth import quantize16, tone_noise, write_audio
from clapcli.audio import decode
from clapcli.audio import AudioInfo, load_audio, probe, quantize_int16, to_model_rate
from clapcli.errors import AudioDecodeError

# (soundfile format, subtype, extension, lossless)
FORMATS = [
    ("WAV", "PCM_16", "wav", True),
    ("WAV", "PCM_24", "wav", True),
    ("WAV", "FLOAT", "wav", True),
    ("FLAC", "PCM_16", "flac", True),
    ("OGG", "VORBIS", "ogg", False),
    ("MP3", "MPEG_LAYER_III", "mp3", False),
    ("AIFF", "PCM_16", "aiff", True),
]
RATES = [8_000, 22_050, 44_100, 48_000, 96_000]
CHANNELS = [1, 2, 6]
SECONDS = 0.5


def _cases():
    for fmt, subtype, ext, lossless in FORMATS:
        for sr in RATES:
            for ch in CHANNELS:
                # MPEG audio has no 96 kHz and at most two channels
                if fmt == "MP3" and (sr > 48_000 or ch > 2):
                    continue
                yield pytest.param(fmt, subtype, ext, lossless, sr, ch, id=f"{ext}-{subtype}-{sr}-{ch}ch")


@pytest.mark.parametrize("fmt,subtype,ext,lossless,sr,channels", list(_cases()))
def test_decode_formats_rates_channels(tmp_path, fmt, subtype, ext, lossless, sr, channels):
    data = tone_noise(SECONDS, sr, channels=channels, seed=sr + channels)
    path = write_audio(tmp_path / f"clip.{ext}", data, sr, format=fmt, subtype=subtype)
    n = len(data)

    info = probe(path)
    assert isinstance(info, AudioInfo)
    assert (info.sample_rate, info.channels, info.frames, info.format) == (sr, channels, n, fmt)
    assert info.duration == pytest.approx(SECONDS, abs=1e-9)

    # at the file's own rate: the mono average of what libsndfile decodes, no resampling, no quantisation
    native = load_audio(path, sample_rate=sr, quantize=False)
    assert native.dtype == np.float32 and native.shape == (n,)
    stored, _ = sf.read(path, dtype="float32", always_2d=True)
    downmix = stored.mean(axis=1, dtype=np.float32)
    if fmt == "MP3":  # mpg123 output after sf.read's seek(0) can differ from a fresh stream by 1 ulp
        np.testing.assert_allclose(native, downmix, rtol=0, atol=1e-6)
    else:
        assert np.array_equal(native, downmix)
    original = data if channels == 1 else data.mean(axis=1)
    if lossless:
        np.testing.assert_allclose(native, original, atol=1e-4)  # int scale 32768 vs 32767 at most
    else:
        assert np.corrcoef(native, original)[0, 1] > 0.95

    # at the model rate: resampled with torchaudio defaults, then int16-quantised
    model = load_audio(path)
    assert model.dtype == np.float32
    assert model.shape == (math.ceil(n * 48_000 / sr),)
    expected = native if sr == 48_000 else AF.resample(torch.from_numpy(native), sr, 48_000).numpy()
    assert np.array_equal(model, quantize16(expected))


def test_mono_average_of_six_channels(tmp_path):
    rng = np.random.default_rng(3)
    data = (rng.uniform(-0.5, 0.5, size=(4_800, 6)) * np.arange(1, 7) / 6).astype(np.float32)
    path = write_audio(tmp_path / "six.wav", data, 48_000, subtype="FLOAT")
    mono = load_audio(path, quantize=False)
    assert np.array_equal(mono, data.mean(axis=1, dtype=np.float32))
    assert not any(np.allclose(mono, data[:, c]) for c in range(6))


def test_block_reading_matches_one_read(tmp_path, monkeypatch):
    data = tone_noise(1.3, 44_100, channels=2, seed=5)
    path = write_audio(tmp_path / "long.flac", data, 44_100)
    whole = load_audio(path)
    monkeypatch.setattr(decode, "_BLOCK_FRAMES", 1_000)  # 58 blocks, the last one partial
    assert np.array_equal(load_audio(path), whole)


def test_to_model_rate_downmix_resample_and_skip():
    x = tone_noise(0.25, 22_050, channels=2, seed=9, quantize=False)
    out = to_model_rate(x, 22_050)
    mono = x.mean(axis=1, dtype=np.float32)
    assert np.array_equal(out, quantize16(AF.resample(torch.from_numpy(mono), 22_050, 48_000).numpy()))
    # already at 48 kHz: no resampling, only the int16 round trip (or nothing)
    y = tone_noise(0.25, 48_000, seed=2, quantize=False)
    assert np.array_equal(to_model_rate(y, 48_000), quantize16(y))
    assert np.array_equal(to_model_rate(y, 48_000, quantize=False), y)
    assert to_model_rate(y[:, None], 48_000, quantize=False).shape == y.shape
    with pytest.raises(ValueError):
        to_model_rate(np.zeros((2, 3, 4), np.float32), 48_000)


def test_resample_is_torchaudio_default():
    x = tone_noise(0.2, 44_100, seed=4, quantize=False)
    ours = to_model_rate(x, 44_100, quantize=False)
    ref = AF.resample(torch.from_numpy(x), 44_100, 48_000).numpy()  # sinc_interp_hann, width 6, rolloff 0.99
    assert np.array_equal(ours, ref)
    # and it is not some other resampler: kaiser windowing gives different samples
    kaiser = AF.resample(torch.from_numpy(x), 44_100, 48_000, resampling_method="sinc_interp_kaiser").numpy()
    assert not np.allclose(ours, kaiser, atol=1e-6)


def test_quantize_int16_truncates_toward_zero():
    x = np.array([0.99999, -0.5, 0.5, 1.5, -2.0, -1e-6, 1e-6, 0.0, 3.0 / 32767, -3.5 / 32767], dtype=np.float32)
    # 0.99999 * 32767 = 32766.67 -> 32766 (not rounded up); -0.5 * 32767 = -16383.5 -> -16383 (toward zero)
    expected_ints = np.array([32766, -16383, 16383, 32767, -32767, 0, 0, 0, 3, -3])
    q = quantize_int16(x)
    assert q.dtype == np.float32
    assert np.array_equal(q, (expected_ints / 32767.0).astype(np.float32))
    qt = quantize_int16(torch.from_numpy(x))
    assert isinstance(qt, torch.Tensor) and qt.dtype == torch.float32
    assert np.array_equal(qt.numpy(), q)
    # the original API's numpy expression, on realistic audio
    y = tone_noise(0.1, 48_000, seed=1, quantize=False) * 1.7
    original = ((np.clip(y, -1, 1) * 32767.0).astype(np.int16) / 32767.0).astype(np.float32)
    assert np.array_equal(quantize_int16(y), original)
    assert np.array_equal(quantize_int16(torch.from_numpy(y)).numpy(), original)
    assert np.array_equal(quantize_int16(original), original)  # idempotent on the grid


def _broken_files(tmp_path):
    good = tone_noise(1.0, 44_100, channels=2, seed=0)
    flac = open(write_audio(tmp_path / "good.flac", good, 44_100), "rb").read()
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "notes.wav").write_text("this is a text file, not audio\n" * 20)
    (tmp_path / "truncated.flac").write_bytes(flac[: len(flac) // 2])
    (tmp_path / "header_only.wav").write_bytes(open(write_audio(tmp_path / "g.wav", good, 44_100), "rb").read()[:30])
    write_audio(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 44_100)
    mp3 = open(write_audio(tmp_path / "good.mp3", good, 44_100), "rb").read()
    (tmp_path / "truncated.mp3").write_bytes(mp3[: len(mp3) // 2])
    (tmp_path / "folder.wav").mkdir()
    # the truncated files decode in part (tests/test_partial.py): not errors
    return {
        "empty.wav": "empty file",
        "notes.wav": "not a recognised audio file",
        "header_only.wav": "data",  # libsndfile: no 'data' chunk marker
        "zero.wav": "no audio frames",
        "missing.ogg": "not found",
        "folder.wav": "directory",
    }


def test_broken_inputs_raise_audio_decode_error(tmp_path):
    for name, reason in _broken_files(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(AudioDecodeError) as caught:
            load_audio(path)
        message = str(caught.value)
        assert reason in message, (name, message)
        assert str(path) in message and "\n" not in message, message


def test_probe_rejects_files_without_audio(tmp_path):
    expected = _broken_files(tmp_path)
    for name in ["empty.wav", "notes.wav", "header_only.wav", "zero.wav", "missing.ogg", "folder.wav"]:
        with pytest.raises(AudioDecodeError, match=expected[name]):
            probe(tmp_path / name)
    # a truncated FLAC has an intact header: probe describes it, decoding reports the damage as `partial`
    assert probe(tmp_path / "truncated.flac").frames == 44_100


# ---- memory bounded by bytes -----------------------------------------------------------------------------

def test_block_sizes_are_bounded_in_bytes_whatever_the_header():
    from clapcli.audio.stream import StreamOptions, stream_block_frames

    budget = decode.MAX_BLOCK_BYTES
    # 4 s of a 1024-channel 768 kHz header would be 12.6 GB per block
    assert stream_block_frames(768_000, 1024, StreamOptions()) * 1024 * 4 <= budget
    assert decode.bounded_block_frames(1024, 1 << 20) * 1024 * 4 <= budget
    assert stream_block_frames(48_000, 2, StreamOptions()) == 192_000  # ordinary files keep 4 s blocks
    assert decode.bounded_block_frames(2, 1 << 20) == 1 << 20
    assert decode.bounded_block_frames(1024, 1 << 20, budget=100) == 1  # at least one frame


def _peak_bytes(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_a_very_wide_file_holds_one_small_block(tmp_path, monkeypatch):
    """A 1024-channel 768 kHz WAV (12.6 MB as float32 for 4 ms) is read in blocks of the byte budget by the
    whole-file decode and by the stream, never the declared block of frames × channels."""
    from clapcli.audio.stream import StreamOptions, file_pieces

    path = tmp_path / "wide.wav"
    rng = np.random.default_rng(0)
    sf.write(path, rng.integers(-3000, 3000, size=(3072, 1024), dtype=np.int16), 768_000, subtype="PCM_16")
    whole = load_audio(path)
    monkeypatch.setattr(decode, "MAX_BLOCK_BYTES", 256 << 10)
    with decode.MonoReader(path) as reader:
        assert reader.block_frames * 1024 * 4 <= 256 << 10
    assert _peak_bytes(lambda: load_audio(path)) < 2 << 20
    opts = StreamOptions(windows=False)
    assert _peak_bytes(lambda: list(file_pieces(0, str(path), opts))) < 2 << 20
    pieces = list(file_pieces(0, str(path), opts))
    assert pieces[0].kind == "clip" and np.array_equal(pieces[0].samples, whole)
    assert np.array_equal(load_audio(path), whole)


def _flac_without_length(path, data: np.ndarray, sr: int) -> None:
    """A FLAC whose STREAMINFO leaves the total sample count unknown (0), as a FLAC written to a pipe."""
    import io

    buf = io.BytesIO()
    sf.write(buf, data, sr, format="FLAC")
    raw = bytearray(buf.getvalue())
    info = 8  # "fLaC" + the metadata block header
    raw[info + 13] &= 0xF0  # the top 4 bits of the 36-bit total sample count ...
    raw[info + 14 : info + 18] = b"\0\0\0\0"  # ... and the other 32
    path.write_bytes(bytes(raw))


def test_a_whole_file_decode_past_the_size_cap_is_refused_naming_the_file(tmp_path, monkeypatch):
    data = tone_noise(20.0, 48_000, channels=2, seed=1)  # 7.7 MB as float32
    declared = write_audio(tmp_path / "long.flac", data, 48_000)
    unknown = tmp_path / "piped.flac"
    _flac_without_length(unknown, data, 48_000)
    assert sf.info(unknown).frames == decode.UNKNOWN_FRAMES
    piped, ref = load_audio(unknown), load_audio(declared)  # an unknown length is no reason to refuse
    assert len(piped) >= len(ref) - 1 and np.array_equal(piped, ref[: len(piped)])  # (libsndfile drops one)
    monkeypatch.setattr(decode, "MAX_DECODED_BYTES", 100_000)
    monkeypatch.setattr(decode, "MAX_BLOCK_BYTES", 16_000)
    for path in (declared, unknown):  # by the header, or by what decodes when the header does not say
        with pytest.raises(AudioDecodeError) as info:
            load_audio(path)
        assert info.value.path == str(path) and "too large to decode whole" in info.value.reason
    peak = _peak_bytes(lambda: pytest.raises(AudioDecodeError, load_audio, unknown))
    assert peak < 1_000_000  # stopped near the cap, not after decoding the whole file (3.8 MB mono)


def test_memory_error_while_decoding_names_the_file(tmp_path, monkeypatch):
    path = write_audio(tmp_path / "a.flac", tone_noise(0.5, 44_100, seed=2), 44_100)

    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 12.6 GB")

    with monkeypatch.context() as m:  # reading a block
        m.setattr(sf.SoundFile, "read", no_memory)
        with pytest.raises(AudioDecodeError) as info:
            load_audio(path)
    assert info.value.path == str(path) and info.value.reason.startswith("out of memory while decoding")
    with monkeypatch.context() as m:  # resampling the decoded file
        m.setattr(AF, "resample", no_memory)
        with pytest.raises(AudioDecodeError) as info:
            load_audio(path)
    assert info.value.path == str(path) and "out of memory" in info.value.reason
