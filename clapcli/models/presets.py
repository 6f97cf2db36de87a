"""Named architectures, stored as data: each preset is a dict of overrides on the `ClapConfig` defaults.

    htsat-tiny-fused   HTSAT-tiny (96, [2,2,6,2]) with feature fusion, RoBERTa-base: laion/clap-htsat-fused
    htsat-tiny         the same without fusion (Slaney mel): laion/clap-htsat-unfused
    htsat-base         HTSAT-base (128, [2,2,12,2]), unfused: laion/larger_clap_*
    htsat-base-fused   HTSAT-base with feature fusion
    tiny               a few-MB fused model for CPU training experiments and tests: HTSAT width 16,
                       depths [2,2,2,1], heads [1,2,2,4] on 2.55 s clips (256 frames folded into 128×128,
                       a quarter of the full model's tokens); a 2-layer RoBERTa of width 64 (2 heads, MLP
                       128, 82 positions = 77 tokens + 2 offset + slack, init std 0.2); joint dim 32. Its
                       vocab_size is the RoBERTa tokenizer's (50265): a caller with another tokenizer sets it
                       from len(tokenizer).
    tiny-unfused       the same without fusion
    wav2clip           Wav2CLIP: ResNet-18 (width 64 → 512) on the linear 16 kHz front end (n_fft 512, hop 353,
                       10 s training crops), audio head 512 → 512, CLIP ViT-B/32's text tower loaded lazily,
                       logit scale 100 (CLIP's)
    tiny-wav2clip      the same with ResNet width 8 (→ 64), joint dim 32, 2.5 s training crops; its text tower
                       must be set (`text_tower`) to a CLIP text model with 32-d `text_embeds`

Fields not named take the dataclass defaults (config.py), so every default is still written once.
"""

from __future__ import annotations

import copy
from typing import Any

from ..errors import UsageError
from .config import ClapConfig

_UNFUSED_FRONTEND = {"mel_scale": "slaney"}  # unfused checkpoints were trained on Slaney mels
_HTSAT_BASE = {"patch_embeds_hidden_size": 128, "depths": [2, 2, 12, 2]}
_TINY_AUDIO = {
    "patch_embeds_hidden_size": 16,
    "depths": [2, 2, 2, 1],
    "num_attention_heads": [1, 2, 2, 4],
    "spec_size": 128,  # (256 frames, 64 bins) folded into 128×128: a quarter of the tokens of 256×256
}
_TINY_FRONTEND = {"clip_samples": 122_400}  # 2.55 s = 256 frames: the clip length of a 128 spec
_TINY_INIT = {"initializer_range": 0.2}  # transformers' 0.02 is for width 768; at 64 every caption starts alike
_TINY_TEXT = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 82,
    "extra": _TINY_INIT,
}

# Wav2CLIP (peers.md §2): linear front end at 16 kHz without int16 round trip; text from a separate CLIP tower
_WAV2CLIP_FRONTEND = {"kind": "linear", "sample_rate": 16_000, "n_fft": 512, "hop_length": 353,
                      "clip_samples": 160_000, "quantize_int16": False}
_WAV2CLIP_TEXT = {"model_type": "clip_text_model"}  # the tower itself is loaded from `text_tower`
_WAV2CLIP_LOGIT_SCALE = 4.605170185988092  # ln(100): CLIP's trained logit scale, used for tagging

PRESETS: dict[str, dict[str, Any]] = {
    "htsat-tiny-fused": {"audio": {"enable_fusion": True}},
    "htsat-tiny": {"audio": {"enable_fusion": False}, "frontend": _UNFUSED_FRONTEND},
    "htsat-base": {"audio": {**_HTSAT_BASE, "enable_fusion": False}, "frontend": _UNFUSED_FRONTEND},
    "htsat-base-fused": {"audio": {**_HTSAT_BASE, "enable_fusion": True}},
    "tiny": {
        "audio": {**_TINY_AUDIO, "enable_fusion": True},
        "text": _TINY_TEXT,
        "frontend": _TINY_FRONTEND,
        "projection_dim": 32,
    },
    "tiny-unfused": {
        "audio": {**_TINY_AUDIO, "enable_fusion": False},
        "text": _TINY_TEXT,
        "frontend": {**_UNFUSED_FRONTEND, **_TINY_FRONTEND},
        "projection_dim": 32,
    },
    "wav2clip": {
        "audio": {"encoder": "resnet18", "resnet_width": 64},
        "text": _WAV2CLIP_TEXT,
        "frontend": _WAV2CLIP_FRONTEND,
        "projection_dim": 512,
        "logit_scale_init": _WAV2CLIP_LOGIT_SCALE,
        "text_tower": "openai/clip-vit-base-patch32",
    },
    "tiny-wav2clip": {
        "audio": {"encoder": "resnet18", "resnet_width": 8},
        "text": _WAV2CLIP_TEXT,
        "frontend": {**_WAV2CLIP_FRONTEND, "clip_samples": 40_000},
        "projection_dim": 32,
        "logit_scale_init": _WAV2CLIP_LOGIT_SCALE,
        "text_tower": "openai/clip-vit-base-patch32",
    },
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> ClapConfig:
    """The architecture of a named model family; an unknown name fails with the list of valid ones."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return ClapConfig.from_dict(copy.deepcopy(PRESETS[name]))
