"""Text towers through transformers: RoBERTa (every released checkpoint), BERT, CLIP text, or any encoder,
and the one tokenisation rule every caller (embedding, tagging, training collate) goes through.

The tower is a plain transformers model built from its config, held by `ClapModel` as `text_model`;
weights come from the CLAP checkpoint. Its pooled output is the `pooler_output` (RoBERTa/BERT:
tanh(dense(h[<s>])); CLIP: the EOT token).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .config import TextConfig

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
        fields.update(dropout=cfg.hidden_dropout_prob, attention_dropout=cfg.attention_probs_dropout_prob)
    else:
        fields.update(hidden_dropout_prob=cfg.hidden_dropout_prob,
                      attention_probs_dropout_prob=cfg.attention_probs_dropout_prob)
    if cfg.model_type in ("roberta", "bert"):
        fields["type_vocab_size"] = cfg.type_vocab_size
    for key in ("architectures", "model_type", "transformers_version", "torch_dtype", "dtype"):
        fields.pop(key, None)
    return AutoConfig.for_model(cfg.model_type, **fields)


def build_text_model(cfg: TextConfig) -> nn.Module:
    """A randomly initialised transformers encoder with a pooler; forward(...).pooler_output is (B, hidden)."""
    from transformers import AutoModel, CLIPTextModel

    tcfg = transformers_config(cfg)
    tcfg._attn_implementation = "sdpa"
    if cfg.model_type == "clip_text_model":
        return CLIPTextModel(tcfg)
    return AutoModel.from_config(tcfg, add_pooling_layer=True)


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
