"""Text towers through transformers: RoBERTa (every released checkpoint), BERT, CLIP text, or any encoder,
and the one tokenisation rule every caller (embedding, tagging, training collate) goes through.

The tower is a plain transformers model built from its config, held by `ClapModel` as `text_model`;
weights come from the CLAP checkpoint. Its pooled output (`pooled_text_output`, width `text_output_width`)
follows `TextConfig.pooling`:
- RoBERTa / BERT: `pooler_output`, tanh(dense(h[<s>/[CLS]])); BERT gets all-zero token_type_ids, as LAION's;
- CLIP text (`CLIPTextModelWithProjection`): `text_embeds`, the EOT token's state through the tower's own
  projection (`TextConfig.projection_dim` wide);
- any other encoder: its `pooler_output` when it has a pooler, else the mean of the last hidden states over
  the attention mask (padding excluded).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ClapError
from .config import TextConfig
from .registry import BERT_TOKENIZER, CLIP_TEXT_TOWER, ROBERTA_TOKENIZER

PADDING = ("longest", "max_length")


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
    if cfg.model_type == "clip_text_model":  # CLIP names its dropout rates differently
        fields.update(dropout=cfg.hidden_dropout_prob, attention_dropout=cfg.attention_probs_dropout_prob,
                      projection_dim=cfg.projection_dim)
    else:
        fields.update(hidden_dropout_prob=cfg.hidden_dropout_prob,
                      attention_probs_dropout_prob=cfg.attention_probs_dropout_prob)
    if cfg.model_type in ("roberta", "bert"):
        fields["type_vocab_size"] = cfg.type_vocab_size
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    return AutoConfig.for_model(cfg.model_type, **fields)


POOLINGS = ("auto", "pooler", "clip", "mean")

# The tokenizer a fresh tower of each kind uses when none is given (hub ids; cached or downloaded).
DEFAULT_TOKENIZERS = {
    "roberta": ROBERTA_TOKENIZER,
    "bert": BERT_TOKENIZER,
    "clip_text_model": CLIP_TEXT_TOWER,
}


def build_text_model(cfg: TextConfig) -> nn.Module:
    """A randomly initialised transformers encoder (with a pooler where the architecture has one)."""
    from transformers import AutoModel, CLIPTextModelWithProjection

    if cfg.pooling not in POOLINGS:
        raise ClapError(f"unknown text pooling {cfg.pooling!r}; choose one of: {', '.join(POOLINGS)}")
    tcfg = transformers_config(cfg)
    tcfg._attn_implementation = "sdpa"
    if cfg.model_type == "clip_text_model":
        return CLIPTextModelWithProjection(tcfg)
    if cfg.pooling == "clip":
        raise ClapError(f"text pooling 'clip' needs a CLIP text tower, not {cfg.model_type!r}")
    try:
        return AutoModel.from_config(tcfg, add_pooling_layer=cfg.pooling != "mean")
    except TypeError:  # architectures without a pooler option (DistilBERT, ...): mean pooling
        return AutoModel.from_config(tcfg)


def text_pooling(tower: nn.Module, cfg: TextConfig) -> str:
    """The pooling `cfg.pooling` means for this tower: "clip", "pooler" or "mean"."""
    if cfg.pooling != "auto":
        return cfg.pooling
    if cfg.model_type == "clip_text_model":
        return "clip"
    return "pooler" if getattr(tower, "pooler", None) is not None else "mean"


def text_output_width(cfg: TextConfig) -> int:
    """Width of the pooled text output (the text projection's input)."""
    return cfg.projection_dim if cfg.model_type == "clip_text_model" else cfg.hidden_size


def pooled_text_output(tower: nn.Module, cfg: TextConfig, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """Token ids and mask (B, L) → the tower's pooled output (B, text_output_width(cfg))."""
    extra = {}
    if cfg.model_type == "bert":
        extra["token_type_ids"] = torch.zeros_like(input_ids)
    out = tower(input_ids=input_ids, attention_mask=attention_mask, **extra)
    kind = text_pooling(tower, cfg)
    if kind == "clip":
        return out.text_embeds
    if kind == "pooler":
        return out.pooler_output
    hidden = out.last_hidden_state  # (B, L, hidden)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def tokenize(
    tokenizer, texts: Sequence[str], max_length: int, padding: str = "longest"
) -> dict[str, torch.Tensor]:
    """Token ids and attention mask (B, L) for `texts`, truncated at `max_length` tokens (the tower's limit,
    `TextConfig.max_length` = 77 for CLAP). padding "longest" pads to the batch's longest text (L ≤ max_length),
    "max_length" to exactly `max_length` (fixed shapes for training)."""
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {', '.join(PADDING)}, not {padding!r}")
    if isinstance(texts, str):
        texts = [texts]
    tok = tokenizer(
        list(texts),
        padding=True if padding == "longest" else "max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
