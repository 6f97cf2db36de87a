"""The contrastive objective of LAION-CLAP: symmetric cross-entropy over scaled audio–text similarities.

For a global batch of N pairs with L2-normalised audio embeddings A (N, D), text embeddings T (N, D) and the
logit scale s (the multiplier exp(raw parameter)):

    logits_per_audio = s·A·Tᵀ,  logits_per_text = s·T·Aᵀ,  labels = 0 … N-1
    loss = (CE(logits_per_audio, labels) + CE(logits_per_text, labels)) / 2      (CE averaged over rows)

The module is pure: rank and world size are constructor arguments, and it only calls the collectives of
`clapcli.dist` when world_size > 1.

Gradients across ranks (W ranks, B pairs each, N = W·B; g = the one-process gradient on the concatenated
batch). Two facts combine: the backward of `dist.all_gather_with_grad` hands each rank the SUM over all ranks
of the gradient reaching its slice, and DDP AVERAGES parameter gradients over ranks.

- local_loss=False (default): every rank computes the same global loss L. Rank r's features receive
  W·∂L/∂F_r through the gather, so its tower gradient is W·(∂L/∂F_r)(∂F_r/∂θ); DDP's average over r gives
  Σ_r (∂L/∂F_r)(∂F_r/∂θ) = g. The logit scale's gradient is ∂L/∂s on every rank, averaged: ∂L/∂s.
- local_loss=True: rank r computes L_r over its own B rows against all N columns (labels offset by r·B), so
  L = mean_r L_r. Rank r's features receive Σ_r' ∂L_r'/∂F_r = W·∂L/∂F_r, hence again g after DDP's average;
  the logit scale's gradient averages to mean_r ∂L_r/∂s = ∂L/∂s. The loss a rank reports is its share:
  average it over ranks (`dist.all_reduce_mean`) to log L. This mode builds (B, N) logits instead of
  (N, N), the option that scales to many GPUs.

So with gather_with_grad=True and DDP, distributed training equals one-process training on the
concatenated batch in both modes, and no extra scaling is needed (tests/test_dist_loss.py checks it with
two Gloo processes). gather_with_grad=False (LAION's option) uses detached copies of the other ranks'
features with the rank's own slice put back as the live tensor: with local_loss=False the tower gradients
come out as g/W (only the rank's own slice carries gradient, and DDP then divides by W); with local_loss=True
the terms where other ranks' rows score this rank's columns are lost altogether.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clapcli import dist

MAX_LOGIT_SCALE = math.log(100)  # the raw logit-scale parameter is clamped to [0, ln 100]


class ClipLoss(nn.Module):
    """Symmetric contrastive loss with explicit distributed context (see the module docstring)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, rank: int = 0, world_size: int = 1):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        if self.gather_with_grad:
            return dist.all_gather_with_grad(local)  # (W·B, D)
        # Detached copies of the other ranks; this rank's own slice stays the live tensor.
        parts = list(dist.all_gather_no_grad(local).chunk(self.world_size, dim=0))
        parts[self.rank] = local
        return torch.cat(parts, dim=0)  # (W·B, D)

    def forward(
        self, audio_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """Scalar loss. audio_embeds, text_embeds: (B, D) of this rank; logit_scale: exp(raw), a scalar."""
        if audio_embeds.shape != text_embeds.shape or audio_embeds.ndim != 2:
            raise ValueError(
                f"audio and text embeddings must both be (B, D); got {tuple(audio_embeds.shape)} "
                f"and {tuple(text_embeds.shape)}"
            )
        batch = audio_embeds.shape[0]
        if self.world_size == 1:
            logits_per_audio = logit_scale * audio_embeds @ text_embeds.T  # (B, B)
            logits_per_text = logit_scale * text_embeds @ audio_embeds.T  # (B, B)
            offset = 0
        else:
            all_audio = self._gather(audio_embeds)  # (N, D)
            all_text = self._gather(text_embeds)  # (N, D)
            if self.local_loss:
                logits_per_audio = logit_scale * audio_embeds @ all_text.T  # (B, N)
                logits_per_text = logit_scale * text_embeds @ all_audio.T  # (B, N)
                offset = self.rank * batch
            else:
                logits_per_audio = logit_scale * all_audio @ all_text.T  # (N, N)
                logits_per_text = logits_per_audio.T
                offset = 0
        labels = torch.arange(logits_per_audio.shape[0], device=logits_per_audio.device) + offset
        return (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clamp_logit_scale_(param: torch.Tensor, max: float = MAX_LOGIT_SCALE) -> torch.Tensor:  # noqa: A002
    """Clamp the RAW logit-scale parameter in place to [0, max] (LAION: after every optimizer step)."""
    with torch.no_grad():
        param.clamp_(0, max)
    return param
