"""The composite CLAP model: audio encoder + text tower + projection heads + logit scales.

State-dict names equal the transformers port (`audio_model.audio_encoder.*`, `text_model.*`,
`{audio,text}_projection.linear{1,2}`, `logit_scale_{a,t}`): the module tree is laid out so that
`state_dict()` IS the project's own format, and Hugging Face checkpoints load without renaming.

The same module embeds (`encode_audio`/`encode_text`) and trains (`forward` → `ClapOutput`, for one
DDP-wrapped module); nothing in here turns gradients off, the inference API does that itself.

Wav2CLIP models (`config.text_tower` set) have no text tower of their own: a frozen transformers CLIP text
model is loaded from that reference the first time text is embedded, held outside the module tree (not in
`state_dict()`, not moved by `.to()` until used), and its `text_embeds` are the text embeddings, so
`text_projection` is the identity. Audio-only use never touches it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClapConfig
from .encoders import build_audio_encoder
from .text import build_text_model, pooled_text_output, text_output_width
from .wav2clip import load_clip_text


class ClapOutput(NamedTuple):
    audio_embeds: torch.Tensor  # (B, projection_dim) float, L2-normalised
    text_embeds: torch.Tensor  # (B', projection_dim) float, L2-normalised
    logit_scale_a: torch.Tensor  # () the multiplier exp(parameter), as the loss uses it
    logit_scale_t: torch.Tensor  # ()


class Projection(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear1 = nn.Linear(d_in, d_out)
        self.linear2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class AudioModel(nn.Module):
    def __init__(self, cfg: ClapConfig):
        super().__init__()
        self.audio_encoder = build_audio_encoder(cfg.audio)


# Parameter names that take no weight decay beyond the ndim < 2 rule (see ClapModel.no_weight_decay).
class ClapTextModel(nn.Module):
    """The text half of `ClapModel` alone: tower, projection and logit scales under the same state-dict names,
    so the text tensors of any CLAP checkpoint load into it (`load_model(..., text_only=True)`: the audio
    weights are never read). Not for Wav2CLIP models, whose text tower is a separate CLIP reference."""

    def __init__(self, cfg: ClapConfig):
        super().__init__()
        if cfg.text_tower is not None:
            raise ValueError("a Wav2CLIP model's text tower is a CLIP reference: load the whole model")
        self.config = cfg
        self.text_model = build_text_model(cfg.text)
        self.text_projection = Projection(text_output_width(cfg.text), cfg.projection_dim)
        self.logit_scale_a = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.logit_scale_t = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """`ClapModel.encode_text`: token ids (B, L) → (B, projection_dim), L2-normalised unless `normalize=False`."""
        pooled = pooled_text_output(self.text_model, self.config.text, input_ids, attention_mask)  # (B, text width)
        projected = self.text_projection(pooled).float()
        return F.normalize(projected, dim=-1) if normalize else projected


NO_DECAY_NAME = re.compile(r"(bias$|norm|(^|\.)bn\d*(\.|$)|position|relative_position_bias_table|^logit_scale_)",
                           re.IGNORECASE)


class ClapModel(nn.Module):
    def __init__(self, cfg: ClapConfig):
        super().__init__()
        self.config = cfg
        self.audio_model = AudioModel(cfg)
        lazy_text = cfg.text_tower is not None
        self.text_model = None if lazy_text else build_text_model(cfg.text)
        self.audio_projection = Projection(self.audio_model.audio_encoder.out_width, cfg.projection_dim)
        self.text_projection = (nn.Identity() if lazy_text
                                else Projection(text_output_width(cfg.text), cfg.projection_dim))
        self._clip_text = None  # Wav2CLIP: (CLIPTextModelWithProjection, tokenizer) once loaded
        self.logit_scale_a = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.logit_scale_t = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.audio_tower_locked = False
        self.text_tower_locked = False
        # Inference only (no grad, eval mode): a callable standing in for the audio encoder, e.g. the
        # onnxruntime engine (models/onnx_audio.py). A plain attribute: not a module, not in state_dict().
        self.audio_runner = None

    # ---- embedding --------------------------------------------------------------------------------------
    def encode_audio(
        self, features: torch.Tensor, is_longer: torch.Tensor | None = None, normalize: bool = True
    ) -> torch.Tensor:
        """(B, C, 1001, 64) mel features → (B, projection_dim) float embeddings, L2-normalised unless
        `normalize=False` (then the raw projection output, as a linear probe wants it)."""
        encoder = self.audio_model.audio_encoder
        if self.audio_runner is not None and not self.training and not torch.is_grad_enabled():
            encoder = self.audio_runner
        pooled = encoder(features, is_longer)  # (B, out_width)
        projected = self.audio_projection(pooled).float()
        return F.normalize(projected, dim=-1) if normalize else projected

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Token ids (B, L) → (B, projection_dim) float embeddings, L2-normalised unless `normalize=False`."""
        if self.config.text_tower is not None:
            tower, _ = self.clip_text()
            projected = tower(input_ids=input_ids, attention_mask=attention_mask).text_embeds.float()  # (B, D)
            return F.normalize(projected, dim=-1) if normalize else projected
        pooled = pooled_text_output(self.text_model, self.config.text, input_ids, attention_mask)  # (B, text width)
        projected = self.text_projection(pooled).float()
        return F.normalize(projected, dim=-1) if normalize else projected

    def clip_text(self):
        """Wav2CLIP: the CLIP text tower and its tokenizer, loaded from `config.text_tower` on first use
        (WeightsNotAvailable / CheckpointError with a one-line reason if it cannot be), frozen, in eval mode,
        on this model's device."""
        if self._clip_text is None:
            self._clip_text = load_clip_text(self.config.text_tower, self.config.projection_dim)
        tower, tokenizer = self._clip_text
        device = self.logit_scale_a.device
        if tower.device != device:
            tower.to(device)
        return tower, tokenizer

    def text_tokenizer(self):
        """The tokenizer of a lazily loaded (Wav2CLIP) text tower; None for models that carry their own."""
        return self.clip_text()[1] if self.config.text_tower is not None else None

    def forward(
        self,
        features: torch.Tensor,
        is_longer: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> ClapOutput:
        """Both towers in one call (what a DDP-wrapped module runs): normalised embeddings and the logit
        scales as multipliers, so a contrastive loss is `out.logit_scale_a * out.audio_embeds @ out.text_embeds.T`."""
        return ClapOutput(
            self.encode_audio(features, is_longer),
            self.encode_text(input_ids, attention_mask),
            self.logit_scale_a.exp(),
            self.logit_scale_t.exp(),
        )

    # ---- training surface -------------------------------------------------------------------------------
    def lock_audio_tower(self) -> None:
        """Freeze the audio encoder (`audio_model.audio_encoder`) and keep it in eval mode, even after
        `train()`: BatchNorm statistics stay put, dropout/drop path stay off. The projection stays trainable."""
        self.audio_model.audio_encoder.requires_grad_(False)
        self.audio_tower_locked = True
        self.audio_model.audio_encoder.eval()

    def lock_text_tower(self) -> None:
        """Freeze the transformers text model and keep it in eval mode, even after `train()`; the projection
        and the logit scales stay trainable. (A lazily loaded Wav2CLIP tower is always frozen.)"""
        self.text_tower_locked = True
        if self.text_model is not None:
            self.text_model.requires_grad_(False)
            self.text_model.eval()

    def train(self, mode: bool = True) -> "ClapModel":
        super().train(mode)
        if self.audio_tower_locked:
            self.audio_model.audio_encoder.eval()
        if self.text_tower_locked and self.text_model is not None:
            self.text_model.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory in both towers: each Swin block and each text layer is recomputed in
        backward instead of keeping its activations (only in training mode with gradients enabled)."""
        self.audio_model.audio_encoder.set_grad_checkpointing(enable)
        # transformers 5.x renamed these to activation_checkpointing_* and warns on the old names
        text = self.text_model
        if text is None:  # Wav2CLIP: the frozen, lazily loaded tower is never trained
            return
        renamed = hasattr(text, "activation_checkpointing_enable")
        if enable and renamed:
            text.activation_checkpointing_enable({"use_reentrant": False})
        elif enable:
            text.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif renamed:
            text.activation_checkpointing_disable()
        else:
            text.gradient_checkpointing_disable()

    def no_weight_decay(self) -> set[str]:
        """Names (as in `named_parameters()` of this module, not of a DDP wrapper) of the parameters that
        take no weight decay. The rule: every parameter with fewer than 2 dimensions (biases, LayerNorm
        and BatchNorm weights, the logit scales), plus any whose name ends in `bias` or contains `norm`,
        a `bn` component, `position` (position embeddings) or `relative_position_bias_table`, plus the
        logit scales by name. Linear and Conv weights, token embeddings and the projections' weights decay."""
        return {name for name, p in self.named_parameters() if p.ndim < 2 or NO_DECAY_NAME.search(name)}
