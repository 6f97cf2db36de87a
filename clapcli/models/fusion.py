"""Attentional feature fusion (AFF, Dai et al. 2021) as used by fused LAION-CLAP checkpoints.

The global view and the local crops are mixed with a learned, per-position weight:
    w = sigmoid(local_att(g + l) + global_att(g + l));  out = 2·g·w + 2·l·(1 − w)
Submodule indices match the released checkpoints (`local_att.{0,1,3,4}`, `global_att.{1,2,4,5}`).
"""

from __future__ import annotations

import torch
from torch import nn


class AFFBlock(nn.Module):
    def __init__(self, channels: int, r: int = 4):
        super().__init__()
        inter = channels // r
        self.local_att = nn.Sequential(
            nn.Conv2d(channels, inter, kernel_size=1),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Conv2d(inter, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )
        self.global_att = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, inter, kernel_size=1),
            nn.BatchNorm2d(inter),
            nn.ReLU(inplace=True),
            nn.Conv2d(inter, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, global_x: torch.Tensor, local_x: torch.Tensor) -> torch.Tensor:
        mixed = global_x + local_x  # (B, C, H, W)
        if self.training and mixed.shape[0] == 1:
            # BatchNorm after the global pooling needs two values per channel in training: run the one
            # clip twice and keep the first result, as the original does
            mixed = mixed.repeat(2, 1, 1, 1)
        weight = torch.sigmoid(self.local_att(mixed) + self.global_att(mixed))[: global_x.shape[0]]
        return 2 * global_x * weight + 2 * local_x * (1 - weight)
