"""Log linear-frequency power spectrogram: the Wav2CLIP front end (FrontEndConfig.kind "linear").

The original computes `torchaudio.transforms.Spectrogram(n_fft=512, hop_length=353)` inside its ResNet
(periodic Hann window of n_fft samples, centred frames with reflect padding, power 2, float32) and then
log(x + 1e-7). This module does the same with the same `torch.stft` call, so the values are the
reference's bit for bit, and returns frames first, like the mel front end: (B, T // hop + 1, n_fft // 2 + 1).
Standardisation is not part of the front end: the encoder does it per item (models/resnet.py).
"""

from __future__ import annotations

import torch

from .config import FrontEndConfig

LOG_OFFSET = 1e-7  # added to the power before the log, as in the original


class LinearFrontEnd(torch.nn.Module):
    """(B, T) waveforms at cfg.sample_rate -> (B, T // hop + 1, n_fft // 2 + 1) float32 log power."""

    def __init__(self, cfg: FrontEndConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True))  # float32, as torchaudio's

    @property
    def min_samples(self) -> int:
        """Fewest samples the centred, reflect-padded STFT accepts."""
        return self.cfg.n_fft // 2 + 1

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            shape = tuple(waves.shape)
            raise ValueError(f"LinearFrontEnd expects (B, T) waveforms (waves[None] for one clip), got {shape}")
        if waves.shape[1] < self.min_samples:
            raise ValueError(f"need at least {self.min_samples} samples for the reflect-padded STFT, "
                             f"got {waves.shape[1]}")
        x = waves.to(device=self.window.device, dtype=torch.float32)
        spec = torch.stft(x, n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length, win_length=self.cfg.n_fft,
                          window=self.window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)  # (B, n_fft // 2 + 1, frames) complex
        power = spec.abs().pow(2.0)
        return torch.log(power + LOG_OFFSET).transpose(1, 2).contiguous()  # (B, frames, n_fft // 2 + 1)
