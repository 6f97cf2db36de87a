"""The composite CLAP model: audio encoder + text tower + projection heads + logit scales.

State-dict names equal the transformers port (`audio_model.audio_encoder.*`, `text_model.*`,
`{audio,text}_projection.linear{1,2}`, `logit_scale_{a,t}`), which is also the project's own format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClapConfig
from .htsat import HTSAT
from .text import TextTower


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
        self.audio_encoder = HTSAT(cfg.audio)


class ClapModel(nn.Module):
    def __init__(self, cfg: ClapConfig):
        super().__init__()
        self.config = cfg
        self.audio_model = AudioModel(cfg)
        self.text_tower = TextTower(cfg.text)
        self.audio_projection = Projection(cfg.audio.final_width, cfg.projection_dim)
        self.text_projection = Projection(cfg.text.hidden_size, cfg.projection_dim)
        self.logit_scale_a = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.logit_scale_t = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    @property
    def text_model(self) -> nn.Module:
        return self.text_tower.encoder

    def encode_audio(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, 1001, 64) mel features → (B, projection_dim) L2-normalised embeddings."""
        pooled = self.audio_model.audio_encoder(features, is_longer)
        return F.normalize(self.audio_projection(pooled).float(), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L) → (B, projection_dim) L2-normalised embeddings."""
        pooled = self.text_tower(input_ids, attention_mask)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    # The released checkpoints name the text tower `text_model`; our module tree holds it as
    # `text_tower.encoder`. These two keep the on-disk names identical to theirs.
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.state_dict().items():
            out[to_checkpoint_key(key)] = value
        return out

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({from_checkpoint_key(k): v for k, v in state.items()}, strict=True)


def to_checkpoint_key(key: str) -> str:
    return "text_model." + key[len("text_tower.encoder.") :] if key.startswith("text_tower.encoder.") else key


def from_checkpoint_key(key: str) -> str:
    return "text_tower.encoder." + key[len("text_model.") :] if key.startswith("text_model.") else key
