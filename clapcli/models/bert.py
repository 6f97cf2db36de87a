"""A plain-torch BERT / RoBERTa encoder with transformers' state-dict layout, for embedding text queries.

Importing transformers' modeling code takes seconds (it pulls in torch._dynamo, torch.distributed and
more) while a text query needs one small forward. This module is that forward and nothing else: the same
parameter names as transformers' `RobertaModel` / `BertModel` (`embeddings.*`, `encoder.layer.N.*`,
`pooler.dense`), the same maths (absolute positions, post-LayerNorm layers, SDPA attention, tanh pooler),
no dropout, no training surface. `supports(cfg)` says which text configs it reproduces; every other tower
(CLIP text, relative positions, other activations) is built by transformers (`models/text.py`).
Equality with transformers is tested (tests/test_speed.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def supports(cfg: TextConfig) -> bool:
    """True when `cfg` describes a tower this module computes exactly as transformers does."""
    return (
        cfg.model_type in ("roberta", "bert")
        and cfg.pooling in ("auto", "pooler")  # a mean-pooled tower goes through transformers
        and cfg.hidden_act in ACTIVATIONS
        and cfg.extra.get("position_embedding_type", "absolute") == "absolute"
        and not cfg.extra.get("is_decoder", False)
        and cfg.hidden_size % cfg.num_attention_heads == 0
    )


class Embeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.roberta = cfg.model_type == "roberta"
        self.pad_token_id = cfg.pad_token_id
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.roberta:  # positions count non-pad tokens from pad_token_id + 1, as RoBERTa was trained
            not_pad = input_ids.ne(self.pad_token_id).long()  # (B, L)
            positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_token_id
        else:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, L)
        types = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(types) + self.position_embeddings(positions)
        return self.LayerNorm(x)  # (B, L, H)


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, self.heads, width // self.heads).transpose(1, 2)  # (B, heads, L, d)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=keep)  # (B, heads, L, d)
        return out.transpose(1, 2).reshape(b, length, width)


class DenseNorm(nn.Module):
    """dense → residual add → LayerNorm: the output half of attention and of the MLP."""

    def __init__(self, d_in: int, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self = SelfAttention(cfg)
        self.output = DenseNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, keep), x)


class Intermediate(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.intermediate = Intermediate(cfg)
        self.output = DenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, keep)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


class Pooler(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H): the first token (<s> / [CLS])


class BertTextEncoder(nn.Module):
    """`forward(input_ids, attention_mask)` → the pooled output (B, hidden), as transformers' pooler_output."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if not supports(cfg):
            raise ValueError(f"the plain-torch text encoder does not cover {cfg.model_type}/{cfg.hidden_act}")
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.pooler = Pooler(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): padded keys take no attention
        x = self.embeddings(input_ids)  # (B, L, H)
        for layer in self.encoder.layer:
            x = layer(x, keep)
        return self.pooler(x)
