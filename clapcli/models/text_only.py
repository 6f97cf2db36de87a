"""The text half of a checkpoint, loaded alone: what a text query needs and nothing more.

`load_text_checkpoint(name)` reads only the `text_model.*`, `text_projection.*` and `logit_scale_*`
tensors of a Hugging Face CLAP directory or a clapcli directory (memory-mapped; the audio tower's
weights are never read), builds the plain-torch BERT/RoBERTa encoder of `models/bert.py` (no
transformers import) and the `tokenizers` tokenizer of `tokenizer.json` (no transformers either).
It returns None where that does not apply (a LAION .pt file, a CLIP text tower, no tokenizer.json, an
explicit `--tokenizer`): the caller then loads the whole model. Embeddings equal the whole model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..identity import weights_fingerprint
from . import registry
from .bert import BertTextEncoder, supports
from .clap import Projection
from .config import ClapConfig
from .weights import OWN_FORMAT, OWN_FORMAT_VERSION, LoadedCheckpoint, build_and_load, read_safetensors

TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale_")
OWN_CONFIG_KEYS = {"audio", "text", "frontend", "projection_dim", "logit_scale_init", "text_tower"}


class ClapTextModel(nn.Module):
    """Text tower + text projection + logit scales, named as in `ClapModel` (so its state dict is the text
    part of a CLAP checkpoint). `encode_text` is `ClapModel.encode_text`."""

    def __init__(self, cfg: ClapConfig):
        super().__init__()
        self.config = cfg
        self.text_model = BertTextEncoder(cfg.text)
        self.text_projection = Projection(cfg.text.hidden_size, cfg.projection_dim)
        self.logit_scale_a = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        self.logit_scale_t = nn.Parameter(torch.tensor(cfg.logit_scale_init))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    normalize: bool = True) -> torch.Tensor:
        """Token ids (B, L) → (B, projection_dim) float embeddings, L2-normalised unless `normalize=False`."""
        projected = self.text_projection(self.text_model(input_ids, attention_mask)).float()
        return F.normalize(projected, dim=-1) if normalize else projected


class FastTokenizer:
    """A `tokenizers.Tokenizer` (from tokenizer.json) called like a transformers fast tokenizer, for the
    arguments `models.text.tokenize` passes: right padding with the pad token, right truncation that
    keeps the special tokens, "pt" tensors."""

    def __init__(self, tokenizer, pad_token: str):
        self._tokenizer = tokenizer
        self.pad_token = pad_token
        self.pad_token_id = tokenizer.token_to_id(pad_token)
        if self.pad_token_id is None:
            raise ValueError(f"the pad token {pad_token!r} is not in the vocabulary")

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, texts: Sequence[str], padding=True, truncation=True, max_length: int | None = None,
                 return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        if return_tensors != "pt":
            raise ValueError("FastTokenizer returns torch tensors only (return_tensors='pt')")
        tok = self._tokenizer
        if truncation and max_length:
            tok.enable_truncation(max_length)
        else:
            tok.no_truncation()
        if padding == "max_length":
            tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.pad_token, length=max_length)
        elif padding:
            tok.enable_padding(pad_id=self.pad_token_id, pad_token=self.pad_token)
        else:
            tok.no_padding()
        encoded = tok.encode_batch([texts] if isinstance(texts, str) else list(texts))
        return {"input_ids": torch.tensor([e.ids for e in encoded], dtype=torch.long),
                "attention_mask": torch.tensor([e.attention_mask for e in encoded], dtype=torch.long)}


def fast_tokenizer(directory: Path) -> FastTokenizer | None:
    """The tokenizer of `directory/tokenizer.json` with the pad token of its tokenizer_config.json or
    special_tokens_map.json; None when there is no tokenizer.json or no pad token is named."""
    file = directory / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        meta = directory / name
        if pad is None and meta.exists():
            value = json.loads(meta.read_text()).get("pad_token")
            pad = value.get("content") if isinstance(value, dict) else value
    if not isinstance(pad, str):
        return None
    try:
        return FastTokenizer(Tokenizer.from_file(str(file)), pad)
    except Exception:  # noqa: BLE001 - an unreadable tokenizer.json: the caller loads the usual way
        return None


def text_config(path: Path) -> tuple[ClapConfig, str] | None:
    """(config, checkpoint kind) of a CLAP model directory whose text tower `models/bert.py` covers, else None."""
    try:
        config = json.loads((path / "config.json").read_text())
        if config.get("format") == OWN_FORMAT:
            inner = config.get("config")
            if (config.get("format_version", 0) > OWN_FORMAT_VERSION or not set(inner) <= OWN_CONFIG_KEYS
                    or inner.get("text_tower")):  # a Wav2CLIP model's text side is a separate CLIP tower
                return None
            cfg, kind = ClapConfig.from_dict(inner), "clapcli"
        elif "audio_config" in config:
            pre_file = path / "preprocessor_config.json"
            pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
            cfg, kind = ClapConfig.from_hf_dict(config, pre), "huggingface"
        else:
            return None
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None  # the whole-model loader reports what is wrong
    return (cfg, kind) if supports(cfg.text) else None


def load_text_checkpoint(name_or_path, tokenizer: str | None = None, download: bool = True):
    """A `LoadedCheckpoint` whose model is a `ClapTextModel`, or None where only the whole model can be loaded."""
    if tokenizer is not None:
        return None
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if registry.lookup(name) is None:
            return None
        path = Path(registry.fetch(name, download=download))
    if not path.is_dir() or not (path / "config.json").exists():
        return None
    found = text_config(path)
    tok = fast_tokenizer(path) if found else None
    if tok is None:
        return None
    cfg, kind = found
    state = read_safetensors(path, prefixes=TEXT_PREFIXES)
    model = build_and_load(cfg, state, str(path), module=ClapTextModel)
    return LoadedCheckpoint(model, tok, name, str(path), kind, weights_fingerprint(path))
