"""Text towers through transformers: RoBERTa (every released checkpoint), BERT, CLIP text, or any encoder.

The tower is a plain transformers model built from its config; weights come from the CLAP checkpoint.
Its pooled output is the `pooler_output` (RoBERTa/BERT: tanh(dense(h[<s>])); CLIP: the EOT token).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import TextConfig

def transformers_config(cfg: TextConfig):
    from transformers import AutoConfig

    fields: dict[str, Any] = dict(cfg.extra)
    fields.update(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        layer_norm_eps=cfg.layer_norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )
    if cfg.model_type in ("roberta", "bert"):
        fields["type_vocab_size"] = cfg.type_vocab_size
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    return AutoConfig.for_model(cfg.model_type, **fields)


class TextTower(nn.Module):
    """Wraps a transformers encoder; forward(input_ids, attention_mask) → pooled (B, hidden)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        from transformers import AutoModel, CLIPTextModel

        tcfg = transformers_config(cfg)
        tcfg._attn_implementation = "sdpa"
        if cfg.model_type == "clip_text_model":
            self.encoder = CLIPTextModel(tcfg)
        else:
            self.encoder = AutoModel.from_config(tcfg, add_pooling_layer=True)
        self.model_type = cfg.model_type

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return out.pooler_output
