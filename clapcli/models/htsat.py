"""HTSAT: the hierarchical token-semantic audio transformer (a Swin transformer over a folded mel).

Parameter names follow the transformers port (`audio_model.audio_encoder.*`), so Hugging Face
checkpoints load without renaming and original LAION checkpoints need one documented key map
(see checkpoints.py). Inference-only details that matter for fidelity:
- BatchNorm over the mel-bin axis, then a bicubic (align_corners=True) stretch 1001 → 1024 frames;
- the (1024, 64) mel is folded into a 256×256 image: row = time block k·64 + mel bin, column = frame;
- fused models mix three local crops into the patch embedding with AFF, but only for clips marked
  `is_longer`; every other clip runs the global path alone (the original evaluation rule).
Training knobs (all inert at 0 and in eval mode): dropout (`drop_rate`, `attn_drop_rate`) and stochastic
depth (`drop_path_rate`, rising linearly over the blocks as in Swin/HTSAT); gradient checkpointing per
Swin block (`set_grad_checkpointing`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .config import AudioConfig
from .fusion import AFFBlock


class PatchEmbed(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        width, p = cfg.patch_embeds_hidden_size, cfg.patch_size
        self.enable_fusion = cfg.enable_fusion
        self.proj = nn.Conv2d(1, width, kernel_size=p, stride=p)
        self.norm = nn.LayerNorm(width)
        if cfg.enable_fusion:
            self.fusion_model = AFFBlock(width, cfg.aff_block_r)
            self.mel_conv2d = nn.Conv2d(1, width, kernel_size=(p, 3 * p), stride=(p, 3 * p))

    def forward(self, image: torch.Tensor, local: torch.Tensor | None, longer_idx: torch.Tensor | None) -> torch.Tensor:
        # image: (B, 1, 256, 256) global view; local: (B', 3, 256, 256) crops of the clips in longer_idx
        x = self.proj(image)  # (B, D, 64, 64)
        if self.enable_fusion and local is not None and longer_idx is not None and longer_idx.numel() > 0:
            x = x.clone()
            x[longer_idx] = self.fusion_model(x[longer_idx], self.local_embedding(local, x.shape[-1]))
        return self.tokens(x)

    def local_embedding(self, local: torch.Tensor, width: int) -> torch.Tensor:
        """The three local crops (B', 3, 256, 256) → one patch map (B', D, 64, width), side by side in time."""
        b, crops, h, w = local.shape
        local = self.mel_conv2d(local.reshape(b * crops, 1, h, w))  # (B'·3, D, 64, 21)
        _, d, lh, lw = local.shape
        local = local.view(b, crops, d, lh, lw).permute(0, 2, 3, 1, 4).flatten(3)  # (B', D, 64, 63)
        return F.pad(local, (0, width - local.shape[-1]))  # (B', D, 64, 64)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.flatten(2).transpose(1, 2))  # (B, D, 64, 64) → (B, 64·64, D)


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    b, h, wd, c = x.shape  # (B, H, W, C) -> (B·nW, w·w, C)
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def window_order(r: int, w: int, shift: int) -> torch.Tensor:
    """Token order of the (shifted) windows: for tokens (B, r·r, C) in row-major order, `x[:, order]` equals
    rolling the (r, r) grid by −shift on both axes and cutting it into w×w windows (window-major, each
    window row-major), and `x[:, argsort(order)]` undoes it. One gather instead of a roll, a 6-d transpose
    and a copy before the attention, and the same again after it; the values are moved, never changed."""
    idx = torch.arange(r * r).view(1, r, r, 1)
    if shift:
        idx = torch.roll(idx, shifts=(-shift, -shift), dims=(1, 2))
    return window_partition(idx, w).flatten()


def relative_position_index(w: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w²)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)  # (w², w², 2)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]


def shift_mask(h: int, wd: int, w: int, shift: int) -> torch.Tensor:
    """Additive mask (nW, w², w²): −100 between tokens that came from different regions after the roll."""

    def regions(n: int) -> torch.Tensor:
        idx = torch.arange(n)
        return (idx >= n - w).long() + (idx >= n - shift).long()

    img = (regions(h)[:, None] * 3 + regions(wd)[None, :]).float()[None, :, :, None]  # (1, H, W, 1)
    win = window_partition(img, w).squeeze(-1)  # (nW, w²)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the clips, rescaling the rest."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", relative_position_index(window))


class AttentionOutput(nn.Module):
    def __init__(self, dim: int, drop: float):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(drop)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, qkv_bias: bool, drop: float, attn_drop: float):
        super().__init__()
        setattr(self, "self", SelfAttention(dim, heads, window, qkv_bias))
        self.output = AttentionOutput(dim, drop)
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        att: SelfAttention = getattr(self, "self")
        bw, n, c = x.shape  # (B·nW, w², C)
        heads, hd, nw = att.heads, c // att.heads, bw // batch
        # One GEMM for query, key and value; then fold windows into the head axis, so one additive mask
        # (nW·heads, w², w²) broadcasts over the batch instead of being copied per clip.
        if isinstance(att.query, nn.Linear):
            weight = torch.cat([att.query.weight, att.key.weight, att.value.weight])
            bias = None if att.query.bias is None else torch.cat([att.query.bias, att.key.bias, att.value.bias])
            qkv = F.linear(x, weight, bias)  # (B·nW, w², 3C)
        else:  # int8-quantised layers (runtime.quantize_int8) expose no weight tensor: three GEMMs
            qkv = torch.cat([att.query(x), att.key(x), att.value(x)], dim=-1)
        qkv = qkv.view(batch, nw, n, 3, heads, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = (t.reshape(batch, nw * heads, n, hd) for t in qkv)  # (B, nW·heads, w², hd)
        rel = att.relative_position_bias_table[att.relative_position_index.view(-1)]
        rel = rel.view(n, n, heads).permute(2, 0, 1)  # (heads, w², w²)
        if mask is None:
            add = rel.expand(nw, heads, n, n)
        else:
            add = rel[None] + mask[:, None]  # (nW, heads, w², w²)
        add = add.reshape(1, nw * heads, n, n).to(q.dtype)
        p = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=add, dropout_p=p)  # (B, nW·heads, w², hd)
        out = out.view(batch, nw, heads, n, hd).transpose(2, 3).reshape(bw, n, c)
        return self.output.dropout(self.output.dense(out))


class Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class SwinBlock(nn.Module):
    def __init__(self, cfg: AudioConfig, dim: int, heads: int, resolution: int, shift: int, drop_path: float):
        super().__init__()
        self.window = min(cfg.window_size, resolution)
        self.shift = 0 if resolution <= cfg.window_size else shift
        self.resolution = resolution
        hidden = int(dim * cfg.mlp_ratio)
        self.layernorm_before = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attention = Attention(dim, heads, self.window, cfg.qkv_bias, cfg.drop_rate, cfg.attn_drop_rate)
        self.layernorm_after = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.intermediate = Dense(dim, hidden)
        self.output = Dense(hidden, dim)
        self.mlp_drop = nn.Dropout(cfg.drop_rate)
        self.drop_path = DropPath(drop_path)
        mask = shift_mask(resolution, resolution, self.window, self.shift) if self.shift else None
        self.register_buffer("attn_mask", mask, persistent=False)
        order = window_order(resolution, self.window, self.shift)
        self.register_buffer("window_order", order, persistent=False)
        self.register_buffer("token_order", torch.argsort(order), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape  # (B, H·W, C)
        h = self.layernorm_before(x).index_select(1, self.window_order)  # (B, nW·w², C), windows in a row
        h = self.attention(h.view(-1, self.window**2, c), self.attn_mask, b)  # (B·nW, w², C)
        x = x + self.drop_path(h.view(b, n, c).index_select(1, self.token_order))
        h = self.mlp_drop(F.gelu(self.intermediate.dense(self.layernorm_after(x))))
        return x + self.drop_path(self.mlp_drop(self.output.dense(h)))


class PatchMerging(nn.Module):
    def __init__(self, dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r = self.resolution
        x = x.view(b, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))  # (B, H·W/4, 2C)


class Stage(nn.Module):
    def __init__(self, cfg: AudioConfig, dim: int, heads: int, resolution: int, downsample: bool,
                 drop_paths: list[float]):
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(cfg, dim, heads, resolution, 0 if i % 2 == 0 else cfg.window_size // 2, p)
            for i, p in enumerate(drop_paths)
        )
        self.downsample = PatchMerging(dim, resolution) if downsample else None
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block inputs; recompute the block in backward (RNG state replayed for drop path)
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class HTSAT(nn.Module):
    """Mel features (B, C, 1001, 64) + is_longer (B,) → pooled audio features (B, out_width = 8·width)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.out_width = cfg.out_width
        self.freq_ratio = cfg.spec_size // cfg.num_mel_bins  # 4
        self.batch_norm = nn.BatchNorm2d(cfg.num_mel_bins)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        grid = cfg.spec_size // cfg.patch_size  # 64
        widths = self.stage_widths(cfg)
        n = sum(cfg.depths)  # one drop-path rate per block, 0 for the first, drop_path_rate for the last
        drop_paths = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # (no tensor: meta-device safe)
        first = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(
            Stage(cfg, widths[i], cfg.num_attention_heads[i], grid // 2**i, i < len(cfg.depths) - 1,
                  drop_paths[first[i] : first[i] + cfg.depths[i]])
            for i in range(len(cfg.depths))
        )
        self.norm = nn.LayerNorm(self.out_width, eps=cfg.layer_norm_eps)

    @staticmethod
    def stage_widths(cfg: AudioConfig) -> list[int]:
        """Token width of each stage: C, 2C, 4C, 8C (patch merging doubles it)."""
        return [cfg.patch_embeds_hidden_size * 2**i for i in range(len(cfg.depths))]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Swin block in backward instead of keeping its activations (training with grad only)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def fold(self, mel: torch.Tensor) -> torch.Tensor:
        b, c, t, f = mel.shape  # (B, C, 1001, 64)
        width, height = self.cfg.spec_size * self.freq_ratio, self.cfg.spec_size // self.freq_ratio
        if t > width or f > height:
            raise ValueError(f"mel of {t} frames × {f} bins exceeds the encoder input ({width} × {height})")
        if t < width:
            mel = F.interpolate(mel, (width, f), mode="bicubic", align_corners=True)
        if f < height:
            mel = F.interpolate(mel, (mel.shape[2], height), mode="bicubic", align_corners=True)
        b, c, t, f = mel.shape  # (B, C, 1024, 64)
        mel = mel.reshape(b, c * self.freq_ratio, t // self.freq_ratio, f).permute(0, 1, 3, 2)
        return mel.reshape(b, c, f * self.freq_ratio, t // self.freq_ratio)  # (B, C, 256, 256)

    def forward(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        # Only channel 0 (the global view) of every clip is used, plus the three local crops of the clips
        # marked is_longer; the copies of a short clip's mel in channels 1-3 are never normalised or folded.
        longer_idx, local = None, None
        if self.cfg.enable_fusion and is_longer is not None:
            longer_idx = torch.nonzero(is_longer.reshape(-1).to(features.device)).flatten()
            if longer_idx.numel() > 0:
                local = self.fold(self.normalise(features[longer_idx, 1:]))  # (B', 3, 256, 256)
        image = self.fold(self.normalise(features[:, :1]))  # (B, 1, 256, 256)
        return self.encode_tokens(self.patch_embed(image, local, longer_idx))

    def encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, 4096, D) → pooled features (B, 8D): the Swin stages, a LayerNorm, the token mean."""
        x = self.pos_drop(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x).mean(dim=1)  # (B, 64, 8D) → mean over all final tokens

    def normalise(self, mel: torch.Tensor) -> torch.Tensor:
        return self.batch_norm(mel.transpose(1, 3)).transpose(1, 3)  # BatchNorm over the mel-bin axis
