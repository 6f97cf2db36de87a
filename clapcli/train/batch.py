"""Training batches: random crops, fusion inputs, optional masking, tokenisation.

Everything random here draws from a generator the caller seeds per batch, so a batch is a pure function of
(seed, epoch, rank, worker, batch number): resuming mid-epoch rebuilds exactly the batches a straight run
would have seen. Inference stays deterministic (`clapcli.audio.features`); only training crops at random.

- A clip longer than 10 s: a fused model gets the fusion input with its three local crops drawn at random,
  one from each third of the valid starts (the LAION-CLAP training rule); an unfused model gets a random
  10 s crop of the waveform.
- A clip of 10 s or less is repeat-padded, as at inference.

The Wav2CLIP objective's batches (`ImageCollate`) carry images instead of tokens: precomputed embeddings as
they are, video frames as the teacher's pixel values, embedded on the training device before the step
(`FrameBatch.resolve`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..audio.features import FeatureBuilder
from ..models.config import FrontEndConfig


class Batch(NamedTuple):
    features: torch.Tensor  # (B, C, 1001, 64) mel input; C = 4 for fused models, 1 otherwise
    is_longer: torch.Tensor  # (B,) bool: the fused model mixes in the local crops for these
    input_ids: torch.Tensor  # (B, L) token ids
    attention_mask: torch.Tensor  # (B, L)

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.features.shape[0]


def random_crop_starts(total_frames: int, chunk_frames: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """One random start from each third of the valid starts (front, middle, back), as in training."""
    parts = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    parts = [p if len(p) else np.array([0]) for p in parts]
    return tuple(int(rng.choice(p)) for p in parts)  # type: ignore[return-value]


def spec_augment(features: torch.Tensor, rng: np.random.Generator, time_masks: int = 2, time_width: int = 64,
                 freq_masks: int = 2, freq_width: int = 8) -> torch.Tensor:
    """Random time and frequency stripes set to each clip's mean level, the same on every fusion channel."""
    out = features.clone()
    _, _, frames, mels = out.shape
    for b in range(out.shape[0]):
        fill = out[b].mean()
        for _ in range(time_masks):
            w = int(rng.integers(0, time_width + 1))
            t0 = int(rng.integers(0, max(1, frames - w)))
            out[b, :, t0 : t0 + w, :] = fill
        for _ in range(freq_masks):
            w = int(rng.integers(0, freq_width + 1))
            f0 = int(rng.integers(0, max(1, mels - w)))
            out[b, :, :, f0 : f0 + w] = fill
    return out


class Collate:
    """(waveforms at 48 kHz, captions, generator) → Batch, on the CPU (it runs in the data workers)."""

    def __init__(self, frontend: FrontEndConfig, fused: bool, tokenizer, max_length: int, spec_augment: bool = False):
        self.frontend, self.fused = frontend, fused
        self.tokenizer, self.max_length = tokenizer, max_length
        self.use_spec_augment = spec_augment
        self._builder: FeatureBuilder | None = None  # built on first use, inside the worker process

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_builder"] = None
        return state

    def __call__(self, waves: Sequence[np.ndarray], texts: Sequence[str], rng: np.random.Generator) -> Batch:
        from ..models.text import tokenize

        features, is_longer = self.features(waves, rng)
        tok = tokenize(self.tokenizer, list(texts), self.max_length, padding="max_length")
        return Batch(features, is_longer, tok["input_ids"], tok["attention_mask"])

    def features(self, waves: Sequence[np.ndarray], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, T, F) training input (random crops, optional masks) and is_longer (B,)."""
        if self._builder is None:
            self._builder = FeatureBuilder(self.frontend, self.fused, "cpu")
        clip = self.frontend.clip_samples
        chunk = self.frontend.clip_frames
        hop = self.frontend.hop_length
        clips, starts = [], []
        for wave in waves:
            if len(wave) > clip and not self.fused:
                offset = int(rng.integers(0, len(wave) - clip + 1))
                clips.append(wave[offset : offset + clip])
                starts.append(None)
            elif len(wave) > clip:
                clips.append(wave)
                starts.append(random_crop_starts(len(wave) // hop + 1, chunk, rng))
            else:
                clips.append(wave)
                starts.append(None)
        features, is_longer = self._builder.clip_features(clips, starts)
        if self.use_spec_augment:
            features = spec_augment(features, rng)
        return features, is_longer


class ImageBatch(NamedTuple):
    """A Wav2CLIP training batch: audio input and one image embedding per clip."""

    features: torch.Tensor  # (B, C, T, F) audio input, as Batch.features
    is_longer: torch.Tensor  # (B,) bool
    images: torch.Tensor  # (B, D) CLIP image embeddings (not normalised)

    def to(self, device: torch.device) -> "ImageBatch":
        return ImageBatch(*(t.to(device, non_blocking=True) for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.features.shape[0]


class FrameBatch(NamedTuple):
    """What the data workers hand over for Wav2CLIP: embeddings where the shards hold them, pixel values of
    the frames the teacher still has to embed."""

    features: torch.Tensor  # (B, C, T, F)
    is_longer: torch.Tensor  # (B,) bool
    images: torch.Tensor  # (B, D) precomputed embeddings; zero rows where a frame stands instead
    pixel_values: torch.Tensor  # (P, 3, H, W) the frames, teacher-preprocessed (P = 0: none)
    frame_rows: torch.Tensor  # (P,) long: the batch row of each frame

    def to(self, device: torch.device) -> "FrameBatch":
        return FrameBatch(*(t.to(device, non_blocking=True) for t in self))

    def __len__(self) -> int:  # type: ignore[override]
        return self.features.shape[0]

    def resolve(self, embed: Callable[[torch.Tensor], torch.Tensor] | None) -> ImageBatch:
        """The batch with every frame replaced by its embedding `embed(pixel_values)` (P, D)."""
        images = self.images
        if self.frame_rows.numel():
            if embed is None:
                raise ValueError("frames in the batch but no teacher to embed them")
            images = images.clone()
            images[self.frame_rows] = embed(self.pixel_values).to(images.dtype)
        return ImageBatch(self.features, self.is_longer, images)


class ImageCollate(Collate):
    """(waveforms, images, generator) → FrameBatch; an image is a (D,) float32 embedding or a decoded RGB
    frame, which `preprocess` (the teacher's image processor) turns into pixel values."""

    def __init__(self, frontend: FrontEndConfig, fused: bool, dim: int, preprocess=None, spec_augment: bool = False):
        super().__init__(frontend, fused, None, 0, spec_augment)
        self.dim, self.preprocess = dim, preprocess

    def __call__(self, waves: Sequence[np.ndarray], images: Sequence, rng: np.random.Generator) -> FrameBatch:
        features, is_longer = self.features(waves, rng)
        embeds = torch.zeros(len(images), self.dim)  # (B, D)
        frames, rows = [], []
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray):
                embeds[i] = torch.from_numpy(image)
            else:
                frames.append(image)
                rows.append(i)
        if frames and self.preprocess is None:
            raise ValueError("image frames need the teacher's preprocessing")
        pixels = self.preprocess(frames) if frames else torch.zeros(0, 3, 1, 1)  # (P, 3, H, W)
        return FrameBatch(features, is_longer, embeds, pixels, torch.tensor(rows, dtype=torch.long))
