"""ResNet-18 audio encoder of Wav2CLIP on a log linear spectrogram, with per-item standardisation.

The layer tree and names are those of the original (`conv1`, `bn1`, `layer{1-4}.{0,1}.{conv1,bn1,conv2,bn2,
downsample.{0,1}}`, torchvision's ResNet), so the released `audio_encoder.*` weights map 1:1. Two
differences from the original module, both deliberate:

- The spectrogram is not computed inside: the features come from the front end (audio/spectrogram.py) as
  (B, 1, frames, bins), like every encoder's input here, and are turned to the original's (B, 1, bins,
  frames) before the first conv.
- Standardisation: the original divides (x - mean) by (std + 1e-9) with the mean and (unbiased) std of the
  WHOLE BATCH tensor, so an embedding depends on what else is in the batch. Here each item is standardised
  with its own mean and std, which equals the original on a batch of one item.

The classifier `fc` of the original (unused in its forward) is not built. Output: AdaptiveAvgPool → (B, 8·width).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import AudioConfig

STD_EPS = 1e-9  # added to the standard deviation, as in the original
RESNET18_BLOCKS = (2, 2, 2, 2)  # BasicBlocks per stage


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:  # 1×1 conv + BN on the shortcut where the shape changes
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def standardise_per_item(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> each item minus its own mean, divided by its own unbiased std + 1e-9."""
    dims = tuple(range(1, x.dim()))
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True)
    return (x - mean) / (std + STD_EPS)


class ResNet18(nn.Module):
    """Log spectrogram (B, 1, frames, bins) + is_longer (ignored) → pooled audio features (B, 8·width)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.resnet_width
        self.out_width = cfg.out_width
        self.conv1 = nn.Conv2d(1, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        widths = [w * 2**i for i in range(len(RESNET18_BLOCKS))]  # 64, 128, 256, 512
        c_in = w
        for i, (c_out, blocks) in enumerate(zip(widths, RESNET18_BLOCKS)):
            stride = 1 if i == 0 else 2
            rest = [BasicBlock(c_out, c_out) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(BasicBlock(c_in, c_out, stride), *rest))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # the original's init: Kaiming (fan_out, relu) convs, BN weight ~ N(1, 0.02), bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, mean=1.0, std=0.02)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage in backward instead of keeping its activations (training with grad only)."""
        self.grad_checkpointing = enable

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def feature_map(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1, frames, bins) → the last stage's map (B, 8·width, bins/32, frames/32), before pooling."""
        if features.dim() != 4 or features.shape[1] != 1:
            raise ValueError(f"ResNet18 expects (B, 1, frames, bins) features, got {tuple(features.shape)}")
        x = standardise_per_item(features.transpose(2, 3))  # (B, 1, bins, frames): the original's layout
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        return self.avgpool(self.feature_map(features)).flatten(1)  # (B, 8·width)
