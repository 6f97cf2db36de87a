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
    pann14-roberta     PANN CNN14 (64…2048 → 2048) without fusion (Slaney mel), RoBERTa-base: LAION's PANN-14
    pann14-roberta-fusion  the same with aff_2d fusion after the first conv block (HTK mel)
    htsat-tiny-fused-bert  htsat-tiny-fused with a bert-base-uncased text tower (pooler output)
    htsat-tiny-fused-clip  htsat-tiny-fused with a CLIP ViT-B/32 text tower (EOT token + its projection, 512)
    tiny-pann, tiny-pann-fused  tiny CNN14 (widths 8…64) without / with fusion, the tiny text tower and clip
    tiny-bert, tiny-clip   `tiny` with a tiny BERT / CLIP text tower (same widths as the tiny RoBERTa)
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
from .registry import CLIP_TEXT_TOWER

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

_PANN = {"encoder": "cnn14"}  # pann_channels default to CNN14's 64…2048
_TINY_PANN = {"encoder": "cnn14", "pann_channels": [8, 16, 16, 32, 32, 64]}
_BERT_BASE = {  # bert-base-uncased
    "model_type": "bert", "vocab_size": 30522, "max_position_embeddings": 512, "type_vocab_size": 2,
    "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
}
_CLIP_TEXT_BASE = {  # openai/clip-vit-base-patch32's text tower
    "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 512, "num_hidden_layers": 12,
    "num_attention_heads": 8, "intermediate_size": 2048, "hidden_act": "quick_gelu", "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": 49406, "eos_token_id": 49407, "projection_dim": 512,
}
_TINY_BERT = {**_TINY_TEXT, "model_type": "bert", "type_vocab_size": 2, "pad_token_id": 0}
_TINY_CLIP = {**_TINY_TEXT, "model_type": "clip_text_model", "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
              "hidden_act": "quick_gelu", "projection_dim": 64}
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
    "pann14-roberta": {"audio": {**_PANN, "enable_fusion": False}, "frontend": _UNFUSED_FRONTEND},
    "pann14-roberta-fusion": {"audio": {**_PANN, "enable_fusion": True}},
    "htsat-tiny-fused-bert": {"audio": {"enable_fusion": True}, "text": _BERT_BASE},
    "htsat-tiny-fused-clip": {"audio": {"enable_fusion": True}, "text": _CLIP_TEXT_BASE},
    "tiny-pann": {
        "audio": {**_TINY_PANN, "enable_fusion": False},
        "text": _TINY_TEXT,
        "frontend": {**_UNFUSED_FRONTEND, **_TINY_FRONTEND},
        "projection_dim": 32,
    },
    "tiny-pann-fused": {
        "audio": {**_TINY_PANN, "enable_fusion": True},
        "text": _TINY_TEXT,
        "frontend": _TINY_FRONTEND,
        "projection_dim": 32,
    },
    "tiny-bert": {
        "audio": {**_TINY_AUDIO, "enable_fusion": True},
        "text": _TINY_BERT,
        "frontend": _TINY_FRONTEND,
        "projection_dim": 32,
    },
    "tiny-clip": {
        "audio": {**_TINY_AUDIO, "enable_fusion": True},
        "text": _TINY_CLIP,
        "frontend": _TINY_FRONTEND,
        "projection_dim": 32,
    },
    "wav2clip": {
        "audio": {"encoder": "resnet18", "resnet_width": 64},
        "text": _WAV2CLIP_TEXT,
        "frontend": _WAV2CLIP_FRONTEND,
        "projection_dim": 512,
        "logit_scale_init": _WAV2CLIP_LOGIT_SCALE,
        "text_tower": CLIP_TEXT_TOWER,
    },
    "tiny-wav2clip": {
        "audio": {"encoder": "resnet18", "resnet_width": 8},
        "text": _WAV2CLIP_TEXT,
        "frontend": {**_WAV2CLIP_FRONTEND, "clip_samples": 40_000},
        "projection_dim": 32,
        "logit_scale_init": _WAV2CLIP_LOGIT_SCALE,
        "text_tower": CLIP_TEXT_TOWER,
    },
}

# One line per preset for `clap models presets`.
DESCRIPTIONS: dict[str, str] = {
    "htsat-tiny-fused": "HTSAT-tiny + RoBERTa-base, fused (laion/clap-htsat-fused)",
    "htsat-tiny": "HTSAT-tiny + RoBERTa-base, unfused (laion/clap-htsat-unfused)",
    "htsat-base": "HTSAT-base + RoBERTa-base, unfused (laion/larger_clap_*)",
    "htsat-base-fused": "HTSAT-base + RoBERTa-base, fused",
    "tiny": "a few-MB fused HTSAT + 2-layer RoBERTa on 2.55 s clips, for CPU experiments and tests",
    "tiny-unfused": "tiny, unfused (Slaney mel)",
    "pann14-roberta": "PANN CNN14 (2048) + RoBERTa-base, unfused (LAION's PANN-14)",
    "pann14-roberta-fusion": "PANN CNN14 (2048) + RoBERTa-base, aff_2d fusion after the first conv block",
    "htsat-tiny-fused-bert": "HTSAT-tiny fused + BERT-base-uncased text tower (pooler output)",
    "htsat-tiny-fused-clip": "HTSAT-tiny fused + CLIP ViT-B/32 text tower (EOT token + projection)",
    "tiny-pann": "tiny CNN14 (widths 8-64) + the tiny RoBERTa, unfused, for tests",
    "tiny-pann-fused": "tiny CNN14 with aff_2d fusion + the tiny RoBERTa, for tests",
    "tiny-bert": "tiny with a 2-layer BERT text tower, for tests",
    "tiny-clip": "tiny with a 2-layer CLIP text tower (EOT + projection), for tests",
    "wav2clip": "Wav2CLIP: ResNet-18 on a 16 kHz linear spectrogram + CLIP ViT-B/32 text tower (lazy)",
    "tiny-wav2clip": "tiny Wav2CLIP (ResNet width 8, dim 32); set its text_tower to a CLIP text model, for tests",
}


def preset_description(name: str) -> str:
    return DESCRIPTIONS.get(name, "")


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> ClapConfig:
    """The architecture of a named model family; an unknown name fails with the list of valid ones."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    return ClapConfig.from_dict(copy.deepcopy(PRESETS[name]))
