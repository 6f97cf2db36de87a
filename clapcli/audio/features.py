"""Model inputs from 48 kHz waveforms: repeat-padding, fusion stacks and 10 s windows.

The rules are those of transformers' `ClapFeatureExtractor` with padding="repeatpad" (truncation "fusion"
for fused checkpoints), with two deliberate differences that make features a pure function of the clip:

- The three local crops of a long clip sit at the middle of their thirds (`fusion_crop_starts`) instead of
  at positions drawn from numpy's global RNG. Pass explicit `crop_starts` to reproduce a random draw.
- A batch of short clips is not given one random `is_longer=True` clip (HF does that in fusion mode, so a
  clip's embedding there depends on its batch). The original LAION code at inference runs such batches
  through the global path only, which is what `is_longer=False` asks the model to do.

Unfused checkpoints see at most 10 s; longer audio is split into `window_starts` windows by the caller
rather than randomly cropped.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import FrontEndConfig
from .frontend import build_frontend


def repeat_pad(wave: torch.Tensor, n: int = 480_000) -> torch.Tensor:
    """(T,) -> (n,): tile the clip floor(n / T) times, then zero-fill to n. T >= n is returned unchanged."""
    if wave.dim() != 1:
        raise ValueError(f"repeat_pad expects a 1-D waveform, got shape {tuple(wave.shape)}")
    length = wave.shape[0]
    if length == 0:
        raise ValueError("cannot pad an empty waveform")
    if length >= n:
        return wave
    tiled = wave.repeat(n // length)
    return F.pad(tiled, (0, n - tiled.shape[0]))


def fusion_crop_starts(total_frames: int, chunk_frames: int = 1001) -> tuple[int, int, int]:
    """Start frames of the front, middle and back crops: the middle of each third of the valid starts.

    The valid starts 0..total_frames - chunk_frames are split into three parts as HF does
    (`np.array_split`, an empty part replaced by [0]); HF draws one start per part at random, here the
    median element of each part is taken.
    """
    if total_frames < chunk_frames:
        raise ValueError(f"a fusion crop needs at least {chunk_frames} frames, got {total_frames}")
    parts = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    parts = [p if len(p) else np.array([0]) for p in parts]
    front, middle, back = (int(p[len(p) // 2]) for p in parts)
    return front, middle, back


def build_fusion_input(
    mel: torch.Tensor, crop_starts: Sequence[int] | None = None, chunk_frames: int = 1001
) -> tuple[torch.Tensor, bool]:
    """Mel of a whole clip (T_total, F) -> ((4, chunk_frames, F), is_longer).

    T_total == chunk_frames (clips up to 480479 samples at hop 480): the mel four times, not longer.
    Longer: [global, front, middle, back], where global is the whole mel resized bilinearly to
    (chunk_frames, F) (align_corners=False, no antialias) and the crops are mel[s : s + chunk_frames].
    """
    if mel.dim() != 2:
        raise ValueError(f"build_fusion_input expects a (frames, mels) mel, got shape {tuple(mel.shape)}")
    total_frames, n_mels = mel.shape
    if total_frames < chunk_frames:
        raise ValueError(f"mel has {total_frames} frames, fewer than one chunk ({chunk_frames}); repeat-pad first")
    if total_frames == chunk_frames:
        return mel.unsqueeze(0).expand(4, -1, -1).contiguous(), False
    starts = fusion_crop_starts(total_frames, chunk_frames) if crop_starts is None else tuple(crop_starts)
    if len(starts) != 3:
        raise ValueError(f"crop_starts needs 3 positions (front, middle, back), got {len(starts)}")
    last = total_frames - chunk_frames
    for s in starts:
        if not 0 <= int(s) <= last:
            raise ValueError(f"crop start {s} outside 0..{last} for a {total_frames}-frame mel")
    shrunk = F.interpolate(mel[None, None], size=(chunk_frames, n_mels), mode="bilinear", align_corners=False)[0, 0]
    crops = [mel[int(s) : int(s) + chunk_frames] for s in starts]
    return torch.stack([shrunk, *crops]), True  # (4, chunk_frames, F)


def window_starts(n_samples: int, window: int = 480_000) -> list[int]:
    """Starts of `window`-sample windows covering every sample: 0, window, 2*window, ..., and a last
    window aligned to the end (n_samples - window). A clip of at most one window gives [0]."""
    if n_samples <= window:
        return [0]
    last = n_samples - window
    return list(range(0, last, window)) + [last]


def _as_tensor(wave, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave)
    if t.dim() != 1:
        raise ValueError(f"each waveform must be 1-D (mono samples), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError("empty waveform")
    return t.to(device=device, dtype=torch.float32)


class FeatureBuilder:
    """Batches of 48 kHz mono waveforms -> the (B, C, 1001, 64) mel input of a CLAP audio encoder.

    C is 4 for fused checkpoints ([global, front, middle, back]) and 1 for unfused ones. The filter bank
    follows cfg.mel_scale ("htk" for the fused checkpoints, "slaney" for the unfused ones). A "linear" front
    end (Wav2CLIP: 16 kHz, (B, 1, clip_frames, 257) log power) follows the unfused rules for fixed-length
    clips; `whole_clip_features` gives the features of a clip of any length (Wav2CLIP embeds whole clips).
    """

    def __init__(self, cfg: FrontEndConfig, fused: bool, device="cpu"):
        self.cfg = cfg
        self.fused = bool(fused)
        self.device = torch.device(device)
        self.frontend = build_frontend(cfg).to(self.device)

    @property
    def channels(self) -> int:
        return 4 if self.fused else 1

    @torch.no_grad()
    def clip_features(
        self, waves: Sequence, crop_starts: Sequence[tuple[int, int, int] | None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """waves: list of 1-D float32 waveforms at cfg.sample_rate (numpy or torch).
        crop_starts: per clip, explicit (front, middle, back) crop frames for long fused clips, or None.
        Returns features (B, C, clip_frames, n_bins) float32 and is_longer (B,) bool, on self.device."""
        if len(waves) == 0:
            raise ValueError("clip_features needs at least one waveform")
        if crop_starts is not None and len(crop_starts) != len(waves):
            raise ValueError(f"crop_starts has {len(crop_starts)} entries for {len(waves)} waveforms")
        n = self.cfg.clip_samples
        frames = self.cfg.clip_frames
        tensors = [_as_tensor(w, self.device) for w in waves]
        out = torch.empty(len(tensors), self.channels, frames, self.cfg.n_bins, device=self.device)
        is_longer = torch.zeros(len(tensors), dtype=torch.bool, device=self.device)

        short = [i for i, t in enumerate(tensors) if t.shape[0] <= n]
        if short:
            padded = torch.stack([repeat_pad(tensors[i], n) for i in short])  # (S, n)
            mel = self.frontend(padded)  # (S, frames, n_mels)
            out[short] = mel.unsqueeze(1).expand(-1, self.channels, -1, -1)

        for i, t in enumerate(tensors):
            if t.shape[0] <= n:
                continue
            if not self.fused:
                raise ValueError(
                    f"waveform {i} has {t.shape[0]} samples, more than one {n}-sample clip; an unfused model "
                    "takes at most one clip, so split longer audio with window_starts first"
                )
            mel = self.frontend(t[None])[0]  # (T_total, n_mels)
            starts = crop_starts[i] if crop_starts is not None else None
            out[i], is_longer[i] = build_fusion_input(mel, starts, frames)
        return out, is_longer

    @torch.no_grad()
    def whole_clip_features(self, wave) -> torch.Tensor:
        """One 1-D waveform of any length -> (1, 1, frames, n_bins) features of all of it, no padding to
        clip_samples (a "linear" front end; Wav2CLIP's utterance mode). A clip too short for one reflect-padded
        STFT frame (at most n_fft // 2 samples) is repeat-padded to n_fft samples first."""
        if self.fused:
            raise ValueError("whole_clip_features is for unfused models")
        t = _as_tensor(wave, self.device)
        if t.shape[0] <= self.cfg.n_fft // 2:
            t = repeat_pad(t, self.cfg.n_fft)
        return self.frontend(t[None])[:, None]  # (1, 1, frames, n_bins)
