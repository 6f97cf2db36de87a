"""Every checkpoint format, auto-detected and loaded strictly.

1. Hugging Face CLAP directories and hub ids (`config.json` with `audio_config`, `model.safetensors`).
2. Original LAION `.pt` files: architecture inferred from the state dict, keys renamed to ours.
3. The project's own format: `config.json` (`"format": "clapcli"`) + `model.safetensors` + tokenizer
   (Wav2CLIP models: no tokenizer; config.json names the CLIP text tower, loaded on first text use).
4. Wav2CLIP's released `Wav2CLIP.pt` (wav2clip.py), told from LAION `.pt` files by its key names.

Weights are read and checked by weights.py: nothing here executes pickled code.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError, ClapError, WeightsNotAvailable, first_line
from ..identity import weights_fingerprint
from . import registry, wav2clip
from .clap import ClapModel, ClapTextModel
from .config import AudioConfig, ClapConfig, FrontEndConfig, TextConfig
from .pann import BLOCKS as PANN_BLOCKS
from .weights import (DERIVED_KEY, OWN_FORMAT, OWN_FORMAT_VERSION, LoadedCheckpoint, build_and_load, read_safetensors,
                      safe_torch_load)


# The tensors of the text half (`ClapTextModel`): all that a text-only load reads.
TEXT_PREFIXES = ("text_model.", "text_projection.", "logit_scale_")


def load_checkpoint(name_or_path: str | os.PathLike, tokenizer: str | None = None, download: bool = True,
                    text_only: bool = False):
    """The checkpoint `name_or_path` (any format above), loaded strictly. With `text_only`, a Hugging Face or
    clapcli directory whose text tower is its own yields a `ClapTextModel` built from the text tensors alone
    (the audio weights are never read); every other checkpoint loads whole."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.exists():
        if registry.lookup(name) is None and (name.startswith((".", "/", "~")) or name.endswith((".pt", ".pth"))):
            raise CheckpointError(f"no such checkpoint file or directory: {name}")
        path = Path(registry.fetch(name, download=download))
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.exists():
            raise CheckpointError(f"{path} has no config.json: not a CLAP model directory")
        config = json.loads(config_file.read_text())
        if config.get("format") == OWN_FORMAT:
            return _load_own(path, config, name, text_only)
        if "audio_config" in config:
            return _load_hf(path, config, name, text_only)
        raise CheckpointError(f"{path}/config.json is not a CLAP config (no audio_config, not a clapcli model)")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_laion(path, name, tokenizer, download)
    raise CheckpointError(f"cannot tell what kind of checkpoint {path} is (expected a directory or a .pt file)")


# ----------------------------------------------------------------------------------------------------------
# Loaders


def _build_from_dir(cfg: ClapConfig, path: Path, text_only: bool) -> torch.nn.Module:
    """The model of a directory's safetensors: the whole `ClapModel`, or with `text_only` the `ClapTextModel`."""
    if text_only:
        return build_and_load(cfg, read_safetensors(path, prefixes=TEXT_PREFIXES), str(path), module=ClapTextModel)
    return build_and_load(cfg, read_safetensors(path), str(path))


def _load_hf(path: Path, config: dict, name: str, text_only: bool = False) -> LoadedCheckpoint:
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
    cfg = _config_or_error(path, lambda: ClapConfig.from_hf_dict(config, pre))
    model = _build_from_dir(cfg, path, text_only)
    return LoadedCheckpoint(model, _tokenizer_from_dir(path), name, str(path), "huggingface", weights_fingerprint(path))


def _load_own(path: Path, config: dict, name: str, text_only: bool = False) -> LoadedCheckpoint:
    version = config.get("format_version", 0)
    if version > OWN_FORMAT_VERSION:
        raise CheckpointError(f"{path} was saved by a newer clapcli (format {version}); upgrade clapcli to load it")
    cfg = _config_or_error(path, lambda: ClapConfig.from_dict(config["config"]))
    if cfg.text_tower is not None:  # Wav2CLIP: the text tower is a reference, loaded on first text use
        stored = cfg.text_tower
        cfg.text_tower = wav2clip.text_tower_reference(stored, path)
        model = build_and_load(cfg, read_safetensors(path), str(path))
        weights = wav2clip.fingerprint_with_text(weights_fingerprint(path), stored)
        return LoadedCheckpoint(model, None, name, str(path), "clapcli", weights)
    model = _build_from_dir(cfg, path, text_only)
    return LoadedCheckpoint(model, _tokenizer_from_dir(path), name, str(path), "clapcli", weights_fingerprint(path))


def _load_laion(path: Path, name: str, tokenizer: str | None, download: bool) -> LoadedCheckpoint:
    raw = safe_torch_load(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if wav2clip.is_wav2clip_state(state):  # Wav2CLIP.pt; `tokenizer` names its CLIP text tower
        return _load_wav2clip(path, state, name, tokenizer)
    hf_state = convert_laion_state_dict(state)
    cfg = infer_laion_config(hf_state)
    model = build_and_load(cfg, hf_state, str(path))
    roberta = cfg.text.model_type == "roberta"
    tok_source = tokenizer or (registry.ROBERTA_TOKENIZER if roberta else registry.BERT_TOKENIZER)
    tok = load_tokenizer(tok_source, download)
    return LoadedCheckpoint(model, tok, name, str(path), "laion", weights_fingerprint(path))


def _load_wav2clip(path: Path, state: dict[str, torch.Tensor], name: str, text_tower: str | None):
    """A `Wav2CLIP.pt` state dict, loaded strictly (a readable diff otherwise), with CLIP's logit scale (100)
    and the CLIP text tower `text_tower` (default CLIP ViT-B/32's) to load lazily."""
    ref = wav2clip.text_tower_reference(text_tower or registry.CLIP_TEXT_TOWER)
    cfg = wav2clip.infer_wav2clip_config(state, ref, str(path))
    ours = wav2clip.convert_wav2clip_state_dict(state, str(path))
    scale = torch.tensor(math.log(wav2clip.CLIP_LOGIT_SCALE))
    ours.setdefault("logit_scale_a", scale)
    ours.setdefault("logit_scale_t", scale)
    model = build_and_load(cfg, ours, str(path))
    weights = wav2clip.fingerprint_with_text(weights_fingerprint(path), ref)
    return LoadedCheckpoint(model, None, name, str(path), "wav2clip", weights)


def _config_or_error(path: Path, build) -> ClapConfig:
    try:
        return build()
    except (ClapError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}/config.json describes no model this version can build: {exc}") from exc


def _tokenizer_from_dir(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {first_line(exc)}") from exc


def load_tokenizer(source: str, download: bool = True):
    """A tokenizer from a local directory or a hub id (cache first; download only if allowed)."""
    from transformers import AutoTokenizer

    if Path(source).expanduser().is_dir():
        return _tokenizer_from_dir(Path(source).expanduser())
    for local_only in ([True, False] if download else [True]):
        try:
            return AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        except Exception:
            continue
    raise WeightsNotAvailable(
        f"the tokenizer {source!r} is not in the Hugging Face cache and cannot be downloaded here; "
        f"fetch it on a connected machine or pass --tokenizer PATH"
    )


# ----------------------------------------------------------------------------------------------------------
# Original LAION checkpoints: key names and architecture

LAION_RENAMES = [
    ("text_branch", "text_model"),
    ("audio_branch", "audio_model.audio_encoder"),
    ("attn", "attention.self"),
    ("self.proj", "output.dense"),
    ("attention.self_mask", "attn_mask"),
    ("mlp.fc1", "intermediate.dense"),
    ("mlp.fc2", "output.dense"),
    ("norm1", "layernorm_before"),
    ("norm2", "layernorm_after"),
    ("bn0", "batch_norm"),
]
# Tensors of the original model that inference does not use (front-end buffers, AudioSet heads, MLP-loss heads).
LAION_UNUSED = re.compile(
    r"^(audio_branch\.(spectrogram_extractor|logmel_extractor|tscam_conv|head|fc_audioset)\.|(audio|text)_transform\.)"
)
# A PANN CNN14 audio branch keeps the original's names (pann.py); only its prefix changes.
LAION_PANN_MARK = "audio_branch.conv_block1."


def convert_laion_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original LAION-CLAP keys → ours (= the transformers port's), qkv split into query/key/value.

    HTSAT audio branches take the transformers port's renames; a PANN CNN14 branch (pann.py keeps the
    original names) only moves from `audio_branch.` to `audio_model.audio_encoder.`."""
    out: dict[str, torch.Tensor] = {}
    pann = any(k.removeprefix("module.").startswith(LAION_PANN_MARK) for k in state)
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if LAION_UNUSED.match(key):
            continue
        if pann and key.startswith("audio_branch."):
            out["audio_model.audio_encoder." + key[len("audio_branch.") :]] = value
            continue
        for old, new in LAION_RENAMES:
            key = key.replace(old, new)
        key = re.sub(r"_projection\.(\d+)\.", lambda m: "_projection.linear1." if m.group(1) == "0" else
                     "_projection.linear2.", key)
        if ".qkv." in key:
            third = value.shape[0] // 3
            for i, part in enumerate(("query", "key", "value")):
                out[key.replace("qkv", part)] = value[i * third : (i + 1) * third]
            continue
        out[key] = value
    return out


def infer_laion_config(state: dict[str, torch.Tensor]) -> ClapConfig:
    enc = "audio_model.audio_encoder."
    if enc + "conv_block1.conv1.weight" in state:
        audio = _infer_laion_pann(state, enc)
    elif enc + "patch_embed.proj.weight" in state:
        audio = _infer_laion_htsat(state, enc)
    else:
        raise CheckpointError("not a LAION-CLAP HTSAT or PANN CNN14 checkpoint (no audio_branch.patch_embed.proj "
                              "or audio_branch.conv_block1 weights)")
    if "text_model.token_embedding.weight" in state:
        raise CheckpointError("LAION checkpoints with the CLIP-transformer text tower are not supported yet")
    fused = audio.enable_fusion
    vocab, hidden = state["text_model.embeddings.word_embeddings.weight"].shape
    positions = state["text_model.embeddings.position_embeddings.weight"].shape[0]
    types = state["text_model.embeddings.token_type_embeddings.weight"].shape[0]
    layers = len({m.group(1) for k in state if (m := re.match(r"text_model\.encoder\.layer\.(\d+)\.", k))})
    roberta = types == 1
    text = TextConfig(
        model_type="roberta" if roberta else "bert",
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),  # head width 64 in every released tower; not stored
        intermediate_size=state["text_model.encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=positions,
        type_vocab_size=types,
        layer_norm_eps=1e-5 if roberta else 1e-12,  # the original towers' own configs
        pad_token_id=1 if roberta else 0,
        bos_token_id=0 if roberta else 101,
        eos_token_id=2 if roberta else 102,
    )
    return ClapConfig(
        audio=audio,
        text=text,
        frontend=FrontEndConfig(mel_scale="htk" if fused else "slaney"),
        projection_dim=state["audio_projection.linear2.weight"].shape[0],
    )


def _infer_laion_htsat(state: dict[str, torch.Tensor], enc: str) -> AudioConfig:
    width = state[enc + "patch_embed.proj.weight"].shape[0]
    depths, heads = [], []
    for stage in range(8):
        block = re.compile(rf"{re.escape(enc)}layers\.{stage}\.blocks\.(\d+)\.")
        blocks = {int(m.group(1)) for k in state if (m := block.match(k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        heads.append(state[f"{enc}layers.{stage}.blocks.0.attention.self.relative_position_bias_table"].shape[1])
    return AudioConfig(
        patch_embeds_hidden_size=width,
        depths=depths,
        num_attention_heads=heads,
        enable_fusion=enc + "patch_embed.mel_conv2d.weight" in state,
    )


def _infer_laion_pann(state: dict[str, torch.Tensor], enc: str) -> AudioConfig:
    """CNN14: the six conv-block widths; fused when the local-crop conv (`mel_conv2d.0`) is there."""
    missing = [i for i in range(1, PANN_BLOCKS + 1) if f"{enc}conv_block{i}.conv1.weight" not in state]
    if missing:
        raise CheckpointError(f"a LAION PANN checkpoint needs conv_block1..{PANN_BLOCKS}; conv_block{missing[0]} is "
                              "missing (only CNN14 is supported, not Cnn6/Cnn10)")
    channels = [int(state[f"{enc}conv_block{i}.conv1.weight"].shape[0]) for i in range(1, PANN_BLOCKS + 1)]
    return AudioConfig(encoder="cnn14", pann_channels=channels, num_mel_bins=state[enc + "bn0.weight"].shape[0],
                       enable_fusion=enc + "mel_conv2d.0.weight" in state)


# ----------------------------------------------------------------------------------------------------------
# Saving in the project's own format


def save_own(model: ClapModel, tokenizer, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not DERIVED_KEY.search(k)}
    # Written beside and renamed into place: a process that has the old weights memory-mapped keeps reading
    # the old file (an in-place overwrite would pull the pages from under it: SIGBUS)
    atomic_write(directory / "model.safetensors",
                 writer=lambda tmp: save_file(state, str(tmp), metadata={"format": OWN_FORMAT}))
    config = {"format": OWN_FORMAT, "format_version": OWN_FORMAT_VERSION, "config": model.config.to_dict()}
    if model.config.text_tower is not None:  # Wav2CLIP: a reference to the tower, not its weights (README)
        config["config"]["text_tower"] = wav2clip.stored_text_tower(model.config.text_tower, directory)
    config.update(extra or {})
    atomic_write(directory / "config.json", json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
