"""Model configuration: dataclasses with every default written once, plus named presets.

The field names follow the transformers CLAP config where one exists, so a Hugging Face
`config.json` maps onto these classes with no renaming table beyond `from_hf_dict`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ClapError


@dataclass
class FrontEndConfig:
    sample_rate: int = 48_000  # Hz; audio is resampled to this before anything else
    n_fft: int = 1024  # STFT size and window length (periodic Hann)
    hop_length: int = 480  # STFT hop in samples (10 ms at 48 kHz)
    n_mels: int = 64  # mel bands
    f_min: float = 50.0  # lowest mel edge, Hz (the hub preprocessors use 50, not the class default 0)
    f_max: float = 14_000.0  # highest mel edge, Hz
    mel_scale: str = "htk"  # "htk" (no filter norm, fused models) or "slaney" (Slaney norm, unfused)
    clip_samples: int = 480_000  # model input length: 10 s at 48 kHz = 1001 frames
    quantize_int16: bool = True  # int16 round trip as in the original training data

    @property
    def clip_frames(self) -> int:
        return self.clip_samples // self.hop_length + 1


@dataclass
class AudioConfig:
    encoder: str = "htsat"  # "htsat" (the released checkpoints)
    patch_embeds_hidden_size: int = 96  # HTSAT width C: tiny 96, base 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])  # Swin blocks per stage
    num_attention_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # heads per stage
    window_size: int = 8  # Swin window (tokens per side)
    spec_size: int = 256  # side of the square "image" the mel is folded into
    patch_size: int = 4  # patch-embed conv kernel and stride
    num_mel_bins: int = 64  # mel bands entering the encoder
    mlp_ratio: float = 4.0  # Swin MLP width / block width
    qkv_bias: bool = True  # bias on query/key/value projections
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon inside HTSAT
    enable_fusion: bool = False  # attentional feature fusion (AFF) for > 10 s input
    aff_block_r: int = 4  # AFF channel reduction ratio
    hidden_size: int = 768  # encoder output width = C * 8

    @property
    def final_width(self) -> int:
        return self.patch_embeds_hidden_size * 2 ** (len(self.depths) - 1)


@dataclass
class TextConfig:
    model_type: str = "roberta"  # transformers model type of the tower: roberta, bert, clip_text_model, ...
    vocab_size: int = 50265  # tokenizer vocabulary
    hidden_size: int = 768  # tower width (input of the text projection)
    num_hidden_layers: int = 12  # transformer layers
    num_attention_heads: int = 12  # attention heads
    intermediate_size: int = 3072  # MLP width
    hidden_act: str = "gelu"  # MLP activation
    max_position_embeddings: int = 514  # RoBERTa: 512 tokens + 2 offset
    type_vocab_size: int = 1  # token type embeddings
    layer_norm_eps: float = 1e-12  # as in the converted hub configs
    pad_token_id: int = 1  # RoBERTa <pad>
    bos_token_id: int = 0  # RoBERTa <s>
    eos_token_id: int = 2  # RoBERTa </s>
    max_length: int = 77  # tokens after truncation, as in the original CLAP tokeniser
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of a foreign tower's config


@dataclass
class ClapConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    projection_dim: int = 512  # joint embedding width
    logit_scale_init: float = 2.6592600345611572  # ln(1 / 0.07)

    @property
    def fused(self) -> bool:
        return self.audio.enable_fusion

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClapConfig":
        return cls(
            audio=_build(AudioConfig, data.get("audio", {})),
            text=_build(TextConfig, data.get("text", {})),
            frontend=_build(FrontEndConfig, data.get("frontend", {})),
            **{k: v for k, v in data.items() if k in ("projection_dim", "logit_scale_init")},
        )

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> "ClapConfig":
        """Build from a transformers `ClapConfig` dict (config.json) and `preprocessor_config.json`."""
        a, t = dict(hf.get("audio_config") or {}), dict(hf.get("text_config") or {})
        audio = _build(AudioConfig, a)
        text = _build(TextConfig, t)
        if "model_type" not in t or t.get("model_type") == "clap_text_model":
            text.model_type = "roberta"
        pre = preprocessor or {}
        fused = audio.enable_fusion
        frontend = FrontEndConfig(
            sample_rate=int(pre.get("sampling_rate", 48_000)),
            n_fft=int(pre.get("fft_window_size", 1024)),
            hop_length=int(pre.get("hop_length", 480)),
            n_mels=int(pre.get("feature_size", audio.num_mel_bins)),
            f_min=float(pre.get("frequency_min", 50.0)),
            f_max=float(pre.get("frequency_max", 14_000.0)),
            mel_scale="htk" if fused else "slaney",
            clip_samples=int(pre.get("nb_max_samples", 480_000)),
        )
        return cls(
            audio=audio,
            text=text,
            frontend=frontend,
            projection_dim=int(hf.get("projection_dim", 512)),
            logit_scale_init=math.log(float(hf.get("logit_scale_init_value", 1 / 0.07))),
        )


def _build(kind, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(kind)}
    known = {k: v for k, v in values.items() if k in names and k != "extra"}
    obj = kind(**known)
    if "extra" in names:
        obj.extra = {k: v for k, v in values.items() if k not in names and not k.startswith("_")}
        obj.extra.update(values.get("extra") or {})
    return obj


def _htsat(width: int, depths: list[int], fused: bool) -> AudioConfig:
    return AudioConfig(
        patch_embeds_hidden_size=width,
        depths=depths,
        enable_fusion=fused,
        hidden_size=width * 8,
    )


def preset(name: str) -> ClapConfig:
    """Architecture of a named model family; an unknown name fails with the list."""
    presets = {
        "htsat-tiny-fused": lambda: ClapConfig(audio=_htsat(96, [2, 2, 6, 2], True)),
        "htsat-tiny": lambda: ClapConfig(
            audio=_htsat(96, [2, 2, 6, 2], False), frontend=FrontEndConfig(mel_scale="slaney")
        ),
        "htsat-base": lambda: ClapConfig(
            audio=_htsat(128, [2, 2, 12, 2], False), frontend=FrontEndConfig(mel_scale="slaney")
        ),
    }
    if name not in presets:
        raise ClapError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(presets))}")
    return presets[name]()
