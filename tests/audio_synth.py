"""Synthesised test audio: tones, a sweep, coloured noise and an envelope, reproducible from a seed.

Shared by the audio tests and any other test that needs a realistic waveform or an audio file on disk.
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf


def quantize16(x: np.ndarray) -> np.ndarray:
    """Snap float samples onto the int16 grid used by the CLAP front end (clip, ×32767, truncate, ÷32767)."""
    return ((np.clip(x, -1.0, 1.0) * np.float32(32767.0)).astype(np.int16) / 32767.0).astype(np.float32)


def _sin_cycles(cycles: np.ndarray) -> np.ndarray:
    """sin(2π·cycles) in float32, wrapping the phase in float64 first so long clips keep their accuracy."""
    return np.sin(np.float32(2 * np.pi) * (cycles % 1.0).astype(np.float32))


def tone_noise(
    seconds: float, sr: int = 48_000, channels: int = 1, seed: int = 0, peak: float = 0.6, quantize: bool = True
) -> np.ndarray:
    """A mix of harmonic tones, a log sweep and coloured noise under a slow envelope with quiet passages.

    Returns float32 (T,) for one channel, (T, channels) otherwise, T = round(seconds * sr), peak
    amplitude `peak`. With quantize=True the samples lie on the int16 grid, so 16-bit files are lossless.
    Channels share the material with different gains and phases, so a downmix differs from every channel.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    if n <= 0:
        raise ValueError(f"need a positive length, got {seconds} s at {sr} Hz")
    t = np.arange(n) / sr  # float64 for phases; the rest is float32 to keep long clips cheap
    t32 = t.astype(np.float32)
    nyquist = sr / 2
    out = np.zeros((n, channels), np.float32)
    sweep_lo, sweep_hi = 80.0, min(12_000.0, 0.45 * sr)
    sweep_rate = np.log(sweep_hi / sweep_lo) / max(seconds, 1e-3)
    sweep = _sin_cycles(sweep_lo * (np.exp(sweep_rate * t) - 1) / sweep_rate)
    white = rng.standard_normal((n, 2))
    # pink noise (1/f power) by shaping white noise in the frequency domain: energy in the low bands
    spectrum = np.fft.rfft(white, axis=0)
    spectrum /= np.sqrt(np.maximum(np.fft.rfftfreq(n, 1 / sr), 20.0))[:, None]
    pink = np.fft.irfft(spectrum, n=n, axis=0).astype(np.float32)
    pink /= np.abs(pink).max() + 1e-12
    white = white.astype(np.float32)
    freqs = rng.uniform(110.0, 2_000.0, size=4)
    fundamentals = [np.float32(2 * np.pi) * ((f0 * t) % 1.0).astype(np.float32) for f0 in freqs]
    for c in range(channels):
        mix = np.zeros(n, np.float32)
        for j, (f0, angle) in enumerate(zip(freqs, fundamentals)):
            phase = np.float32(rng.uniform(0, 2 * np.pi))
            for h in range(1, 6):  # a few harmonics below Nyquist
                if h * f0 < nyquist:
                    mix += np.float32(0.5 / (h * (j + 1))) * np.sin(np.float32(h) * (angle + phase))
        mix += np.float32(0.3 * (1.0 + 0.2 * c)) * sweep
        mix += np.float32(0.4) * pink[:, c % 2] + np.float32(0.05) * white[:, (c + 1) % 2]
        # envelope: slow tremolo, decaying onsets every ~0.7 s and a quiet dip
        env = 0.6 + 0.4 * np.sin(np.float32(2 * np.pi * (0.3 + 0.1 * c)) * t32 + np.float32(c))
        env *= 0.5 + 0.5 * np.exp(-(t32 % np.float32(0.7)) / np.float32(0.15))
        dip_at, dip_width = np.float32(0.6 * seconds), np.float32(0.05 * seconds + 1e-3)
        env *= 1.0 - 0.97 * np.exp(-(((t32 - dip_at) / dip_width) ** 2))
        out[:, c] = mix * env
    out *= peak / (np.abs(out).max() + 1e-12)
    out = out.astype(np.float32)
    if quantize:
        out = quantize16(out)
    return out[:, 0] if channels == 1 else out


def write_audio(path, data: np.ndarray, sr: int, format: str | None = None, subtype: str | None = None) -> str:
    """Write (T,) or (T, C) samples with soundfile; format/subtype as soundfile names them ("FLAC", "PCM_24")."""
    path = os.fspath(path)
    sf.write(path, data, sr, format=format, subtype=subtype)
    return path
