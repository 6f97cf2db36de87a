"""The audio front end's configuration: how a waveform becomes the features a model reads. A model's config
(`clapcli.models.config.ClapConfig.frontend`) holds one; the front ends in this floor read it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FrontEndConfig:
    kind: str = "mel"  # "mel": log-mel in dB (LAION-CLAP); "linear": log linear power STFT, log(x + 1e-7) (Wav2CLIP)
    sample_rate: int = 48_000  # Hz; audio is resampled to this before anything else
    n_fft: int = 1024  # STFT size and window length (periodic Hann)
    hop_length: int = 480  # STFT hop in samples (10 ms at 48 kHz)
    n_mels: int = 64  # mel bands (kind "mel"; a "linear" front end has n_fft // 2 + 1 bins)
    f_min: float = 50.0  # lowest mel edge, Hz (the hub preprocessors use 50, not the class default 0)
    f_max: float = 14_000.0  # highest mel edge, Hz
    mel_scale: str = "htk"  # "htk" (no filter norm, fused models) or "slaney" (Slaney norm, unfused)
    clip_samples: int = 480_000  # model input length: 10 s at 48 kHz = 1001 frames
    quantize_int16: bool = True  # int16 round trip as in the original training data
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of a foreign preprocessor config, unused

    @property
    def clip_frames(self) -> int:
        return self.clip_samples // self.hop_length + 1

    @property
    def n_bins(self) -> int:
        """Feature bins per frame: n_mels for kind "mel", n_fft // 2 + 1 for kind "linear"."""
        return self.n_fft // 2 + 1 if self.kind == "linear" else self.n_mels

    def settings(self) -> dict[str, Any]:
        """The fields that decide the features (everything but `extra`): what a model's identity compares.

        `kind` is left out when it is "mel", so identities stored before the field existed (which lack it,
        meaning "mel") still match."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "extra" and not (f.name == "kind" and self.kind == "mel")}
