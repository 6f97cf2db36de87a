"""PANN CNN14: the convolutional audio encoder of LAION-CLAP's `PANN-14` models, with `aff_2d` feature fusion.

Parameter names are the original's (`bn0`, `conv_block1..6.{conv1,bn1,conv2,bn2}`, `fc1`, and for fused
models `mel_conv2d.{0,1}` and `fusion_model.*`), so a LAION-format checkpoint needs only its `audio_branch.`
prefix renamed. The original computes its Slaney log-mel inside the model (unfused) or takes the HTK fusion
stack (fused); here both come from the project's front end (`audio/features.py`), as for HTSAT, and the
AudioSet head `fc_audioset` is left out (inference never reads it).

Forward, with widths C1..C6 = `AudioConfig.pann_channels` (64, 128, 256, 512, 1024, 2048):
- `bn0` over the mel-bin axis, then six conv blocks (3×3 conv, BN, ReLU, twice, no conv bias), 2×2 average
  pooling after blocks 1–5 (none after 6), dropout 0.2 after every block (train only);
- mean over frequency, then max over time + mean over time, dropout 0.5, `fc1` + ReLU (dropout 0.5 again in
  training, as the original's `embedding`): (B, C6).
- Fusion (`aff_2d`): block 1 runs on the global channel; for the clips marked `is_longer`, each of the three
  local crops goes through `mel_conv2d` (5×5 conv, stride (6, 2), padding 2, BN, ReLU), the crops are joined
  along time, zero-padded or cut to the global length, and mixed into the global map by AFF. Clips not marked
  longer (≤ 10 s) run the global path only. Unlike the original, no random clip is forced onto the fusion
  path when none is longer (the original PANN does that even in eval); training marks clips as HTSAT's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..errors import ClapError
from .config import AudioConfig
from .fusion import AFFBlock

BLOCKS = 6  # conv blocks of CNN14
BLOCK_DROPOUT = 0.2  # after every conv block (train only)
HEAD_DROPOUT = 0.5  # before and after fc1 (train only)


class ConvBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x  # (B, C, T/pool, F/pool)


class Cnn14(nn.Module):
    """Mel features (B, C, T, 64) + is_longer (B,) → pooled audio features (B, out_width = pann_channels[-1])."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        widths = list(cfg.pann_channels)
        if len(widths) != BLOCKS or min(widths) < 1:
            raise ClapError(f"a CNN14 encoder needs {BLOCKS} positive pann_channels, got {widths}")
        self.cfg = cfg
        self.out_width = cfg.out_width
        self.enable_fusion = cfg.enable_fusion
        self.bn0 = nn.BatchNorm2d(cfg.num_mel_bins)
        for i, (c_in, c_out) in enumerate(zip([1] + widths[:-1], widths), start=1):
            self.add_module(f"conv_block{i}", ConvBlock(c_in, c_out))
        self.fc1 = nn.Linear(widths[-1], widths[-1])
        if cfg.enable_fusion:
            self.mel_conv2d = nn.Sequential(
                nn.Conv2d(1, widths[0], kernel_size=5, stride=(6, 2), padding=2),
                nn.BatchNorm2d(widths[0]),
                nn.ReLU(inplace=True),
            )
            self.fusion_model = AFFBlock(widths[0], cfg.aff_block_r)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each conv block in backward instead of keeping its activations (training with grad only)."""
        self.grad_checkpointing = enable

    def block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, f"conv_block{i}")
        pool = 2 if i < BLOCKS else 1
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(conv, x, pool, use_reentrant=False)
        return conv(x, pool)

    def normalise(self, mel: torch.Tensor) -> torch.Tensor:
        return self.bn0(mel.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel-bin axis

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        # features: (B, C, T, F); channel 0 is the (global) clip, channels 1-3 a fused model's local crops
        x = self.block(1, self.normalise(features[:, :1]))  # (B, C1, T/2, F/2)
        if self.enable_fusion and is_longer is not None:
            longer_idx = torch.nonzero(is_longer.reshape(-1).to(features.device)).flatten()
            if longer_idx.numel() > 0:
                x = x.clone()
                x[longer_idx] = self.fusion_model(x[longer_idx], self.local_features(features[longer_idx], x))
        x = F.dropout(x, BLOCK_DROPOUT, self.training)
        for i in range(2, BLOCKS + 1):
            x = F.dropout(self.block(i, x), BLOCK_DROPOUT, self.training)  # (B, Ci, T/2^i, F/2^i), last unpooled
        x = x.mean(dim=3)  # (B, C6, T') mean over frequency
        x = x.max(dim=2).values + x.mean(dim=2)  # (B, C6)
        x = F.dropout(x, HEAD_DROPOUT, self.training)
        x = F.relu(self.fc1(x))
        return F.dropout(x, HEAD_DROPOUT, self.training)

    def local_features(self, features: torch.Tensor, global_x: torch.Tensor) -> torch.Tensor:
        """The local crops (B', 3, T, F) of the longer clips → one map (B', C1, T/2, F/2) like the global one."""
        local = self.normalise(features[:, 1:])  # (B', 3, T, F)
        b, crops, t, f = local.shape
        local = self.mel_conv2d(local.reshape(b * crops, 1, t, f))  # (B'·3, C1, ~T/6, F/2)
        _, c, lt, lf = local.shape
        local = local.view(b, crops, c, lt, lf).permute(0, 2, 1, 3, 4).flatten(2, 3)  # (B', C1, 3·lt, F/2)
        th, tw = global_x.shape[-2:]
        if lf != tw:
            raise ValueError(f"local crops give {lf} frequency columns, the global path {tw}")
        if local.shape[2] < th:
            return F.pad(local, (0, 0, 0, th - local.shape[2]))
        return local[:, :, :th]
