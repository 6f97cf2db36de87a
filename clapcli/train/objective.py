"""The Wav2CLIP distillation objective (`clap train --objective wav2clip`): the cross-projection ("CX") loss.

With a = the audio encoder's pooled output (B, W), audio_head = the model's audio projection (Wav2CLIP's
`audio_transform`, W → D), img = frozen CLIP image embeddings (B, D) and image_head = a trainable
Linear-ReLU-Linear MLP (Wav2CLIP's `image_transform`, D → W → W):

    L = ( CLIP_1(a, image_head(img)) + CLIP_2(audio_head(a), img) ) / 2

CLIP_k(x, y) is the symmetric InfoNCE of `loss.ClipLoss` on L2-normalised rows (so it runs across ranks with
the same feature gather as CLAP training) with its OWN learnable logit scale, as the original has two
`CLIPLoss1D` modules, each with a temperature initialised to 1/0.07; the halving is the original's too
(`clip_loss_x` in lyrebird-wav2clip's pre_training/model.py). Both logit scales and the image head live in the
trainer (`Wav2ClipObjective`: optimised, checkpointed in trainer_state.pt, restored on --resume); the saved
model keeps its own logit scales untouched. Text plays no part: the text tower is neither run nor trained.

The image head's dropout (0.1 in the original `MLPLayers`) is left out: it would make the head's output a
function of the dropout draw, and the head is thrown away after training.

Widths: the second term needs the model's projection dim to equal the image embeddings' D (`check_widths`).
In the original W = D = 512 and the image head is D → D → D; here the head maps into the encoder's width W,
which is the same module when W = D and lets any audio encoder be distilled (an HTSAT's 768 against CLIP
ViT-B/32's 512, the tiny presets' 64 or 128 against 32) instead of refusing every W ≠ D.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .loss import ClipLoss, clamp_logit_scale_

LOGIT_SCALE_INIT = math.log(1 / 0.07)  # both temperatures start at 0.07, as CLIPLoss1D


class ImageHead(nn.Module):
    """Wav2CLIP's `image_transform`: Linear(D, W) → ReLU → Linear(W, W) (W = D in the original)."""

    def __init__(self, dim: int, width: int | None = None):
        super().__init__()
        width = width or dim
        self.linear1 = nn.Linear(dim, width)
        self.linear2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class Wav2ClipObjective(nn.Module):
    """The trainer's own parameters: the image head and the two logit scales (raw, exp() is the multiplier)."""

    def __init__(self, dim: int, width: int | None = None, logit_scale_init: float = LOGIT_SCALE_INIT):
        super().__init__()
        self.image_head = ImageHead(dim, width)  # image embeddings (D) → the audio encoder's space (W)
        self.logit_scale_ai = nn.Parameter(torch.tensor(logit_scale_init))  # CLIP_1(a, image_head(img))
        self.logit_scale_pi = nn.Parameter(torch.tensor(logit_scale_init))  # CLIP_2(audio_head(a), img)


class Wav2ClipOutput(NamedTuple):
    audio_pooled: torch.Tensor  # (B, W) a, L2-normalised
    audio_projected: torch.Tensor  # (B, D) audio_head(a), L2-normalised
    images: torch.Tensor  # (B, D) img, L2-normalised
    images_projected: torch.Tensor  # (B, W) image_head(img), L2-normalised
    logit_scale_ai: torch.Tensor  # () exp(raw) of CLIP_1
    logit_scale_pi: torch.Tensor  # () exp(raw) of CLIP_2


class Wav2ClipLoss(nn.Module):
    """L = (CLIP(a, image_head(img)) + CLIP(audio_head(a), img)) / 2 on normalised rows; rank and world size
    are arguments, as for `ClipLoss` (one ClipLoss serves both terms: it has no parameters)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.clip = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                             world_size=world_size)

    def forward(self, out: Wav2ClipOutput) -> torch.Tensor:
        first = self.clip(out.audio_pooled.float(), out.images_projected.float(), out.logit_scale_ai.float())
        second = self.clip(out.audio_projected.float(), out.images.float(), out.logit_scale_pi.float())
        return (first + second) / 2


class Wav2ClipTrainee(nn.Module):
    """The model being distilled and the objective's parameters as ONE module, so one optimizer and one DDP
    wrapper cover both. Only the audio encoder and the audio projection of the model train."""

    def __init__(self, model: nn.Module, objective: Wav2ClipObjective):
        super().__init__()
        self.model = model
        self.objective = objective
        for name, p in model.named_parameters():
            if not name.startswith(("audio_model.", "audio_projection.")):
                p.requires_grad_(False)  # the text side and the model's own logit scales stay as they are

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor, images: torch.Tensor) -> Wav2ClipOutput:
        pooled = self.model.audio_model.audio_encoder(features, is_longer)  # (B, W) a
        projected = self.model.audio_projection(pooled)  # (B, D) audio_head(a)
        images = images.float()
        head = self.objective.image_head(images)  # (B, W) image_head(img)
        return Wav2ClipOutput(
            F.normalize(pooled.float(), dim=-1), F.normalize(projected.float(), dim=-1),
            F.normalize(images, dim=-1), F.normalize(head.float(), dim=-1),
            self.objective.logit_scale_ai.exp(), self.objective.logit_scale_pi.exp(),
        )

    def clamp_logit_scales_(self) -> None:
        clamp_logit_scale_(self.objective.logit_scale_ai)
        clamp_logit_scale_(self.objective.logit_scale_pi)

    def logit_scales(self) -> dict[str, float]:
        return {"logit_scale_ai": round(float(self.objective.logit_scale_ai.detach().exp()), 4),
                "logit_scale_pi": round(float(self.objective.logit_scale_pi.detach().exp()), 4)}

    def no_weight_decay(self) -> set[str]:
        """The model's rule (`ClapModel.no_weight_decay`) under `model.`, plus the head's biases and the scales."""
        names = {f"model.{n}" for n in self.model.no_weight_decay()}
        return names | {f"objective.{n}" for n, p in self.objective.named_parameters() if p.ndim < 2}


def check_widths(model: nn.Module, teacher_dim: int | None) -> tuple[int, int]:
    """(D, W): the image embeddings' width (= the model's projection dim) and the audio encoder's; UsageError
    when the teacher's embeddings are not D wide."""
    cfg = model.config
    dim, width = cfg.projection_dim, cfg.audio.out_width
    if teacher_dim is not None and teacher_dim != dim:
        raise UsageError(f"--teacher embeds images to {teacher_dim} values, the model's projection dim is {dim}: "
                         "they must match (audio_head(a) is compared with the image embeddings)")
    return dim, width
