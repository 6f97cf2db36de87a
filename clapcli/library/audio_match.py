"""Same recording or similar sound: a check on the decoded audio of two files.

Embeddings put copies of one recording close together, but also different recordings that sound alike (two
snare hits, two takes of one line). This check tells them apart on the audio itself. The rule:

1. Both files are decoded, mixed to mono and resampled to `MATCH_RATE` (8 kHz): format, sample rate, bit depth
   and channel count stop mattering, and what lossy codecs keep (everything below 4 kHz) is what is compared.
2. Each gets a loudness envelope: RMS per 4 ms frame in dB relative to its own loudest frame (so gain does
   not matter). Frames within `ACTIVE_DB` of the loudest are the file's non-silent part.
3. The envelopes of the non-silent parts are cross-correlated over every offset (FFT); the `LAG_CANDIDATES`
   best offsets are tried, which finds silence trimmed or added at the ends (to 4 ms).
4. At an offset, the overlap must cover at least `MIN_COVERAGE` of the non-silent part of the file that has
   less of it. Over the overlap (at most `MAX_COMPARE_S` seconds of it, in blocks spread evenly) both files'
   short-time spectra (64 ms frames, 62 Hz–3.75 kHz) are compared by their *coherence*: per frequency bin,
   |Σ_t X·conj(Y)| / sqrt(Σ_t |X|² · Σ_t |Y|²), which is 1 when one file is the other times a gain and a
   small delay, and near 0 when their phases are unrelated. The score is its mean over the bins within
   `BAND_DB` of the strongest one.
5. The pair is the same recording when the best offset's score is at least `MIN_COHERENCE`.

Copies (lossless or lossy, resampled, re-quantised, remixed to mono, louder or quieter, trimmed or padded) keep
the waveform's phase: they score ≥ 0.95 in our measurements (benchmarks/RESULTS.md). Different recordings that
sound alike (other noise in a hit, another take with its own timing and pitch) share loudness and spectral
shape, which coherence ignores, and score far lower. What it cannot tell apart: two renderings of the same
synthesiser patch that are bit-identical where they are loud.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..audio.decode import AudioInfo, _resampling_rate, read_mono

MATCH_RATE = 8_000  # Hz: the common rate both files are compared at
HOP = 32  # samples per envelope frame at MATCH_RATE (4 ms): the alignment's resolution
N_FFT = 512  # samples per spectrogram frame (64 ms)
SPEC_HOP = 128  # samples between spectrogram frames (16 ms)
LOW_BIN, HIGH_BIN = 4, 241  # spectrogram bins compared: 62.5 Hz to 3.75 kHz
FLOOR_DB = -60.0  # envelope values below this (dB relative to the file's loudest frame) are the floor
ACTIVE_DB = -45.0  # frames within this of the loudest frame are the non-silent part of a file
LAG_CANDIDATES = 3  # best envelope offsets tried with the spectrogram check
MIN_COVERAGE = 0.8  # share of the shorter non-silent part that the overlap must cover
BAND_DB = -30.0  # frequency bins within this of the strongest (in both files' power) are compared
MIN_COHERENCE = 0.85  # mean coherence from which two files are one recording
MAX_COMPARE_S = 60.0  # seconds of the overlap compared at most (in `COMPARE_BLOCKS` blocks spread evenly)
COMPARE_BLOCKS = 6


@dataclass
class Fingerprint:
    """What the check needs of one file: its audio at MATCH_RATE and loudness envelope."""

    info: AudioInfo  # header facts of the file (format, sample rate, channels, duration)
    subtype: str  # soundfile's subtype name: PCM_16, PCM_24, FLOAT, VORBIS, MPEG_LAYER_III, ...
    samples: np.ndarray  # (T,) float32 mono at MATCH_RATE
    envelope: np.ndarray  # (T // HOP,) float32 dB relative to the loudest frame, floored at FLOOR_DB
    active: np.ndarray  # (T // HOP,) bool: the non-silent frames


@dataclass
class Match:
    same: bool  # the verdict: one recording
    score: float  # mean spectral coherence at the best offset (0…1)
    offset: float  # seconds: b's start lies this far after a's start (negative: before)
    coverage: float  # share of the shorter non-silent part the overlap covers


def fingerprint(path: str) -> Fingerprint:
    """Decode a file for `match` (AudioDecodeError if it cannot be read)."""
    import soundfile as sf

    mono, info = read_mono(path)
    try:
        subtype = str(sf.info(path).subtype)
    except (RuntimeError, OSError, ValueError):  # decoded a moment ago; a name the header probe cannot read
        subtype = ""
    samples = _to_match_rate(mono, info.sample_rate)
    envelope = _envelope(samples)
    return Fingerprint(info, subtype, samples, envelope, envelope > ACTIVE_DB)


def _to_match_rate(mono: np.ndarray, sr: int) -> np.ndarray:
    """(T,) at `sr` → (T',) float32 at MATCH_RATE, as `audio.decode.to_model_rate` resamples (torchaudio's
    sinc defaults) but with the kernel built once per rate: building it costs more than applying it."""
    if sr == MATCH_RATE:
        return np.ascontiguousarray(mono, dtype=np.float32)
    import torch

    with torch.no_grad():
        return _resampler(sr)(torch.from_numpy(np.ascontiguousarray(mono, dtype=np.float32))).numpy()


@functools.lru_cache(maxsize=8)
def _resampler(sr: int):
    import torchaudio

    return torchaudio.transforms.Resample(_resampling_rate(sr, MATCH_RATE), MATCH_RATE)


def _envelope(samples: np.ndarray) -> np.ndarray:
    frames = len(samples) // HOP
    power = np.square(samples[: frames * HOP].reshape(frames, HOP), dtype=np.float64).mean(axis=1)  # (F,)
    return _relative_db(power).astype(np.float32)


def _relative_db(power: np.ndarray) -> np.ndarray:
    """Power → dB relative to its maximum, floored at FLOOR_DB (all floor for silence)."""
    top = power.max() if power.size else 0.0
    if top <= 0:
        return np.full(power.shape, FLOOR_DB)
    return np.maximum(10.0 * np.log10(np.maximum(power / top, 1e-12)), FLOOR_DB)


def match(a: Fingerprint, b: Fingerprint) -> Match:
    """Whether `a` and `b` hold the same recording (see the module's rule)."""
    best = Match(False, 0.0, 0.0, 0.0)
    if not a.active.any() or not b.active.any():
        return best
    for lag in _best_lags(a.envelope, b.envelope):
        coverage = _coverage(a.active, b.active, lag)
        if coverage < MIN_COVERAGE:
            continue
        score = _coherence(a.samples, b.samples, lag * HOP)
        if score > best.score:
            best = Match(False, score, lag * HOP / MATCH_RATE, coverage)
    best.same = best.score >= MIN_COHERENCE
    return best


def _best_lags(env_a: np.ndarray, env_b: np.ndarray) -> list[int]:
    """The LAG_CANDIDATES offsets (in frames; b's frame j lies on a's frame j + lag) whose envelope
    cross-correlation is highest, best first."""
    x = np.where(env_a > ACTIVE_DB, env_a - env_a[env_a > ACTIVE_DB].mean(), 0.0)  # silence adds nothing
    y = np.where(env_b > ACTIVE_DB, env_b - env_b[env_b > ACTIVE_DB].mean(), 0.0)
    size = 1 << int(np.ceil(np.log2(len(x) + len(y))))
    corr = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(y, size)), size)  # corr[l] = Σ x[i] y[i - l]
    lags = np.concatenate([np.arange(0, len(x)), np.arange(-len(y) + 1, 0)])
    values = np.concatenate([corr[: len(x)], corr[size - len(y) + 1:]])
    order = np.argsort(-values, kind="stable")
    chosen: list[int] = []
    for i in order:  # distinct peaks: skip offsets next to one already chosen
        lag = int(lags[i])
        if all(abs(lag - c) > 2 for c in chosen):
            chosen.append(lag)
        if len(chosen) == LAG_CANDIDATES:
            break
    return chosen


def _coverage(active_a: np.ndarray, active_b: np.ndarray, lag: int) -> float:
    """Share of the non-silent frames of the file with fewer of them that fall inside the overlap at `lag`."""
    lo, hi = max(0, lag), min(len(active_a), len(active_b) + lag)  # overlap in a's frames
    inside_a = active_a[lo:hi].sum() if hi > lo else 0
    inside_b = active_b[lo - lag: hi - lag].sum() if hi > lo else 0
    total_a, total_b = active_a.sum(), active_b.sum()
    return float(inside_a / total_a if total_a <= total_b else inside_b / total_b)


def _coherence(x: np.ndarray, y: np.ndarray, shift: int) -> float:
    """Spectral coherence of x and y with y's sample i on x's sample i + shift: per frequency bin
    |Σ_t X Y*| / sqrt(Σ_t |X|² · Σ_t |Y|²), averaged over the bins within BAND_DB of the strongest."""
    lo, hi = max(0, shift), min(len(x), len(y) + shift)
    if hi - lo < N_FFT:
        return 0.0
    spans = _compare_spans(lo, hi)
    spec_x = np.concatenate([_spectrogram(x[s:e]) for s, e in spans])  # (F, bins) complex
    spec_y = np.concatenate([_spectrogram(y[s - shift:e - shift]) for s, e in spans])
    cross = np.abs((spec_x * np.conj(spec_y)).sum(axis=0))  # (bins,)
    power = np.sqrt(np.square(np.abs(spec_x)).sum(axis=0) * np.square(np.abs(spec_y)).sum(axis=0))  # (bins,)
    if power.max() <= 0:
        return 0.0
    band = power >= power.max() * 10.0 ** (BAND_DB / 10.0)
    return float(np.mean(cross[band] / power[band]))


def _compare_spans(lo: int, hi: int) -> list[tuple[int, int]]:
    """The overlap [lo, hi), or COMPARE_BLOCKS blocks spread evenly over it when it is longer than
    MAX_COMPARE_S (in samples)."""
    limit = int(MAX_COMPARE_S * MATCH_RATE)
    if hi - lo <= limit:
        return [(lo, hi)]
    block = limit // COMPARE_BLOCKS
    starts = np.linspace(lo, hi - block, COMPARE_BLOCKS).astype(np.int64)
    return [(int(s), int(s) + block) for s in starts]


def _spectrogram(x: np.ndarray) -> np.ndarray:
    """(T,) → (F, HIGH_BIN - LOW_BIN) complex spectra of Hann-windowed frames."""
    frames = 1 + (len(x) - N_FFT) // SPEC_HOP
    if frames <= 0:
        return np.empty((0, HIGH_BIN - LOW_BIN), dtype=np.complex64)
    idx = np.arange(N_FFT)[None, :] + SPEC_HOP * np.arange(frames)[:, None]  # (F, N_FFT)
    return np.fft.rfft(x[idx] * np.hanning(N_FFT).astype(np.float32), axis=1)[:, LOW_BIN:HIGH_BIN]
