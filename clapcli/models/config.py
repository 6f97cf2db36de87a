"""Model configuration: dataclasses with every default written once.

The field names follow the transformers CLAP config where one exists, so a Hugging Face
`config.json` maps onto these classes with no renaming table beyond `from_hf_dict`. Fields a class
does not know (a foreign config's extras) are kept in its `extra` dict and written back by `to_dict`.
Named presets live in presets.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import InitVar, dataclass, field
from typing import Any

from ..audio.config import FrontEndConfig
from ..errors import ClapError


@dataclass
class AudioConfig:
    encoder: str = "htsat"  # audio encoder kind, a name in encoders.AUDIO_ENCODERS: "htsat" (the released
    # checkpoints) or "cnn14" (PANN CNN14)
    patch_embeds_hidden_size: int = 96  # HTSAT width C: tiny 96, base 128
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])  # Swin blocks per stage
    num_attention_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # heads per stage
    window_size: int = 8  # Swin window (tokens per side)
    spec_size: int = 256  # side of the square "image" the mel is folded into
    patch_size: int = 4  # patch-embed conv kernel and stride
    num_mel_bins: int = 64  # mel bands entering the encoder
    resnet_width: int = 64  # Wav2CLIP ResNet-18 ("resnet18"): channels of the first stage, doubled per stage (→ 8×)
    mlp_ratio: float = 4.0  # Swin MLP width / block width
    qkv_bias: bool = True  # bias on query/key/value projections
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon inside HTSAT
    enable_fusion: bool = False  # attentional feature fusion (AFF) for > 10 s input
    aff_block_r: int = 4  # AFF channel reduction ratio
    drop_rate: float = 0.0  # dropout after the patch embedding, the attention output and in the MLPs (train only)
    attn_drop_rate: float = 0.0  # dropout on attention probabilities (train only)
    drop_path_rate: float = 0.0  # stochastic depth of the last Swin block, rising linearly from 0 over the blocks
    # (LAION trained HTSAT with 0.1; train only)
    pann_channels: list[int] = field(default_factory=lambda: [64, 128, 256, 512, 1024, 2048])  # CNN14 only: widths
    # of conv_block1..6; the encoder outputs the last (2048) and AFF fuses at the first (64)
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of a foreign config, kept, unused
    # Legacy input only: configs written before the encoder owned its output width carry `hidden_size`
    # (HTSAT: C * 8). Accepted, checked against the encoder's width, never stored; read `out_width`.
    hidden_size: InitVar[int | None] = None

    def __post_init__(self, hidden_size: int | None) -> None:
        if hidden_size is not None and self.encoder in AUDIO_OUTPUT_WIDTHS and int(hidden_size) != self.out_width:
            raise ClapError(
                f"audio config says hidden_size {hidden_size}, but a {self.encoder} encoder of this shape "
                f"outputs {self.out_width} features"
            )

    @property
    def out_width(self) -> int:
        """Width of the encoder's pooled output (the audio projection's input), from the config alone."""
        try:
            width = AUDIO_OUTPUT_WIDTHS[self.encoder]
        except KeyError:
            raise ClapError(f"unknown audio encoder {self.encoder!r}; choose one of: "
                            f"{', '.join(sorted(AUDIO_OUTPUT_WIDTHS))}") from None
        return width(self)


# The one formula for each audio encoder's output width (the encoder classes in encoders.py read it):
# HTSAT doubles its width C at each stage after the first; CNN14 ends at its last block's channels; Wav2CLIP's
# ResNet-18 doubles resnet_width over its four stages.
AUDIO_OUTPUT_WIDTHS = {
    "htsat": lambda cfg: cfg.patch_embeds_hidden_size * 2 ** (len(cfg.depths) - 1),
    "cnn14": lambda cfg: int(cfg.pann_channels[-1]),
    "resnet18": lambda cfg: cfg.resnet_width * 2 ** 3,
}


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
    hidden_dropout_prob: float = 0.0  # dropout on embeddings and layer outputs, train only (LAION's roberta-base
    # training used the transformers default 0.1; the hub configs carry 0.1 and loading them keeps it)
    attention_probs_dropout_prob: float = 0.0  # dropout on attention probabilities, train only (LAION: 0.1)
    pooling: str = "auto"  # the tower's pooled output: "pooler" (pooler_output: RoBERTa/BERT tanh(dense(h[0]))),
    # "clip" (CLIP text_embeds: the EOT token through the tower's own projection), "mean" (mean of the last
    # hidden states over the attention mask), "auto" (clip for CLIP text, else pooler if the tower has one, else mean)
    projection_dim: int = 512  # CLIP text towers only: width of the tower's own text_projection (its text_embeds)
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of a foreign tower's config


@dataclass
class ClapConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    frontend: FrontEndConfig = field(default_factory=FrontEndConfig)
    projection_dim: int = 512  # joint embedding width
    logit_scale_init: float = 2.6592600345611572  # ln(1 / 0.07)
    # Wav2CLIP: a transformers CLIP text model (directory or hub id) loaded on first text use, whose `text_embeds`
    # are the text embeddings (no text projection here); None: the text tower is part of this model's weights
    text_tower: str | None = None

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
            **{k: v for k, v in data.items() if k in ("projection_dim", "logit_scale_init", "text_tower")},
        )

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], preprocessor: dict[str, Any] | None = None) -> "ClapConfig":
        """Build from a transformers `ClapConfig` dict (config.json) and `preprocessor_config.json`."""
        a, t = dict(hf.get("audio_config") or {}), dict(hf.get("text_config") or {})
        audio = _build(AudioConfig, a)
        text = _build(TextConfig, t)
        if "model_type" not in t or t.get("model_type") == "clap_text_model":
            text.model_type = "roberta"
        pre = dict(preprocessor or {})
        fused = audio.enable_fusion
        mapped = dict(
            sample_rate=int(pre.pop("sampling_rate", 48_000)),
            n_fft=int(pre.pop("fft_window_size", 1024)),
            hop_length=int(pre.pop("hop_length", 480)),
            n_mels=int(pre.pop("feature_size", audio.num_mel_bins)),
            f_min=float(pre.pop("frequency_min", 50.0)),
            f_max=float(pre.pop("frequency_max", 14_000.0)),
            clip_samples=int(pre.pop("nb_max_samples", 480_000)),
        )
        frontend = FrontEndConfig(mel_scale="htk" if fused else "slaney", **mapped, extra=_foreign(pre))
        return cls(
            audio=audio,
            text=text,
            frontend=frontend,
            projection_dim=int(hf.get("projection_dim", 512)),
            logit_scale_init=math.log(float(hf.get("logit_scale_init_value", 1 / 0.07))),
        )


def _foreign(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if not k.startswith("_")}


def _build(kind, values: dict[str, Any]):
    """An instance of dataclass `kind` from a dict: known fields set, the rest kept in `extra`.

    Fields a previous version kept in `extra` but that are known now (say, dropout rates) become fields."""
    merged = {**(values.get("extra") or {}), **{k: v for k, v in values.items() if k != "extra"}}
    accepted = set(kind.__dataclass_fields__) - {"extra"}  # includes init-only (legacy) inputs
    obj = kind(**{k: v for k, v in merged.items() if k in accepted})
    obj.extra = _foreign({k: v for k, v in merged.items() if k not in accepted})
    return obj

