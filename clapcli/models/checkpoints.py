"""Every checkpoint format, auto-detected and loaded strictly.

1. Hugging Face CLAP directories and hub ids (`config.json` with `audio_config`, `model.safetensors`).
2. Original LAION `.pt` files: architecture inferred from the state dict, keys renamed to ours.
3. The project's own format: `config.json` (`"format": "clapcli"`) + `model.safetensors` + tokenizer
   (Wav2CLIP models: no tokenizer; config.json names the CLIP text tower, loaded on first text use).
4. Wav2CLIP's released `Wav2CLIP.pt` (wav2clip.py), told from LAION `.pt` files by its key names.

Nothing here executes pickled code: `.pt` files go through `torch.load(weights_only=True)`, and only on a torch
with no known way around it (`SAFE_TORCH`, also the floor in pyproject.toml).
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import CheckpointError, ClapError, WeightsNotAvailable
from . import registry, wav2clip
from .clap import ClapModel
from .config import AudioConfig, ClapConfig, FrontEndConfig, TextConfig

OWN_FORMAT = "clapcli"
# The first torch whose weights_only unpickler has no published bypass: 2.6 fixed CVE-2025-32434 (code run
# through weights_only=True), 2.10 fixed CVE-2026-24747 (memory corruption from a crafted .pt, GHSA-63cw-57p8-fm3p).
SAFE_TORCH = (2, 10)
OWN_FORMAT_VERSION = 1

# Buffers a model rebuilds from its config. Checkpoints may carry them or not; they are never compared.
DERIVED_KEY = re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|relative_position_index|attn_mask)$")


@dataclass
class LoadedCheckpoint:
    model: ClapModel
    tokenizer: Any
    name: str  # what the user asked for
    source: str  # resolved local path
    kind: str  # "huggingface" | "laion" | "wav2clip" | "clapcli"
    fingerprint: str  # short hash of the weights file(s)


def load_checkpoint(name_or_path: str | os.PathLike, tokenizer: str | None = None, download: bool = True):
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
            return _load_own(path, config, name)
        if "audio_config" in config:
            return _load_hf(path, config, name)
        raise CheckpointError(f"{path}/config.json is not a CLAP config (no audio_config, not a clapcli model)")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _load_laion(path, name, tokenizer, download)
    raise CheckpointError(f"cannot tell what kind of checkpoint {path} is (expected a directory or a .pt file)")


# ----------------------------------------------------------------------------------------------------------
# Loaders


def _load_hf(path: Path, config: dict, name: str) -> LoadedCheckpoint:
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.exists() else {}
    cfg = _config_or_error(path, lambda: ClapConfig.from_hf_dict(config, pre))
    state = _read_safetensors(path)
    model = build_and_load(cfg, state, str(path))
    return LoadedCheckpoint(model, _tokenizer_from_dir(path), name, str(path), "huggingface", _fingerprint(path))


def _load_own(path: Path, config: dict, name: str) -> LoadedCheckpoint:
    version = config.get("format_version", 0)
    if version > OWN_FORMAT_VERSION:
        raise CheckpointError(f"{path} was saved by a newer clapcli (format {version}); upgrade clapcli to load it")
    cfg = _config_or_error(path, lambda: ClapConfig.from_dict(config["config"]))
    if cfg.text_tower is not None:  # Wav2CLIP: the text tower is a reference, loaded on first text use
        stored = cfg.text_tower
        cfg.text_tower = wav2clip.text_tower_reference(stored, path)
        model = build_and_load(cfg, _read_safetensors(path), str(path))
        weights = wav2clip.fingerprint_with_text(_fingerprint(path), stored)
        return LoadedCheckpoint(model, None, name, str(path), "clapcli", weights)
    model = build_and_load(cfg, _read_safetensors(path), str(path))
    return LoadedCheckpoint(model, _tokenizer_from_dir(path), name, str(path), "clapcli", _fingerprint(path))


def _load_laion(path: Path, name: str, tokenizer: str | None, download: bool) -> LoadedCheckpoint:
    raw = safe_torch_load(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    if wav2clip.is_wav2clip_state(state):  # Wav2CLIP.pt; `tokenizer` names its CLIP text tower
        return wav2clip.load_released_checkpoint(path, state, name, tokenizer)
    hf_state = convert_laion_state_dict(state)
    cfg = infer_laion_config(hf_state)
    model = build_and_load(cfg, hf_state, str(path))
    tok_source = tokenizer or (registry.ROBERTA_TOKENIZER if cfg.text.model_type == "roberta" else "bert-base-uncased")
    tok = load_tokenizer(tok_source, download)
    return LoadedCheckpoint(model, tok, name, str(path), "laion", _fingerprint(path))


def _config_or_error(path: Path, build) -> ClapConfig:
    try:
        return build()
    except (ClapError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}/config.json describes no model this version can build: {exc}") from exc


def safe_torch_load(path: Path) -> Any:
    import pickle

    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None or tuple(map(int, found.groups())) < SAFE_TORCH:
        raise CheckpointError(
            f"refusing to load {path} with torch {torch.__version__}: a crafted .pt file can run code in it even with "
            f"weights_only=True (CVE-2026-24747); upgrade to torch>={'.'.join(map(str, SAFE_TORCH))} or use a "
            "safetensors model")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors, which could run code "
            f"({reason[:160]}). Only plain state dicts are loaded; convert it with a trusted tool first"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {str(exc).splitlines()[0]}") from exc


def _read_safetensors(path: Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of every *.safetensors file in `path`, memory-mapped (pages are read when first touched,
    and `build_and_load` makes them the model's parameters: no second copy). With `prefixes`, only the
    keys that start with one of them are taken: the rest of the file is never read."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights (pytorch_model.bin is not loaded: it is a pickle)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if prefixes is None or key.startswith(prefixes):
                        state[key] = handle.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as exc:  # safetensors raises SafetensorError (a RuntimeError)
            raise CheckpointError(f"cannot read {f}: {str(exc).splitlines()[0] if str(exc) else exc}") from exc
    return state


def _tokenizer_from_dir(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}") from exc


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


def _fingerprint(path: Path) -> str:
    """Hash of size + first and last 4 MiB of each weights file: cheap, and changes with any re-save."""
    from ..identity import weights_fingerprint

    return weights_fingerprint(path)


# ----------------------------------------------------------------------------------------------------------
# Strict loading with a readable diff


def build_and_load(cfg: ClapConfig, state: dict[str, torch.Tensor], source: str, module=ClapModel) -> torch.nn.Module:
    """`module(cfg)` (ClapModel by default) with the weights of `state`, strictly: any missing, unused or
    misshapen tensor is a CheckpointError listing them. The module is built with its parameters on the
    `meta` device (no random initialisation, no memory) and `state`'s tensors become its parameters
    (`assign=True`: a memory-mapped state is not copied); buffers derived from the config (position ids,
    attention masks) are computed for real, and BatchNorm statistics come from `state`."""
    with parameters_on_meta():
        model = module(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not DERIVED_KEY.search(k)}
    given = {k: v for k, v in state.items() if not DERIVED_KEY.search(k)}
    diff = state_dict_diff(expected, given)
    if diff:
        raise CheckpointError(f"{source} does not match the architecture it declares:\n{diff}")
    # assign keeps the checkpoint's dtype: cast where it differs (an fp16 file into an fp32 model)
    given = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in given.items()}
    given = _unaliased(given)
    model.load_state_dict(given, strict=False, assign=True)  # strict in effect: the diff above is empty
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors were not loaded (e.g. {left[0]})")
    return model.eval()


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every tensor that is the same memory as an earlier one (one tensor under two names, as a
    converter may fill two scales from one value) replaced by a copy: assigned as they are, aliases would
    become tied parameters that train together and that safetensors refuses to save."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state.items():
        where = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.stride())
        out[name] = tensor.clone() if where in seen and tensor.numel() else tensor
        seen.add(where)
    return out


# The torch.nn.init functions made no-ops while a model is built on `meta`: its parameters get their values
# from the checkpoint, and some of these (normal_, trunc_normal_) would import torch._dynamo for meta tensors.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextmanager
def parameters_on_meta():
    """Within this block, every parameter a module registers lives on the `meta` device and torch.nn.init
    does nothing: constructing a model allocates no weights and runs no random initialisation. Buffers stay
    real (so buffers a module computes from its config, like position ids or attention masks, keep their
    values). Not thread-safe: it patches torch.nn.Module.register_parameter for the duration."""
    register = torch.nn.Module.register_parameter
    inits = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip(tensor, *args, **kwargs):
        return tensor

    torch.nn.Module.register_parameter = on_meta
    for name in inits:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(torch.nn.init, name, fn)


def state_dict_diff(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], limit: int = 12) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"  {k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    parts = []
    for title, rows in (
        ("missing from the checkpoint", [f"  {k}" for k in missing]),
        ("not used by the model", [f"  {k}" for k in unexpected]),
        ("shape mismatches", shapes),
    ):
        if rows:
            more = f"\n  … and {len(rows) - limit} more" if len(rows) > limit else ""
            parts.append(f"{len(rows)} {title}:\n" + "\n".join(rows[:limit]) + more)
    return "\n".join(parts)


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
    from .pann import BLOCKS

    missing = [i for i in range(1, BLOCKS + 1) if f"{enc}conv_block{i}.conv1.weight" not in state]
    if missing:
        raise CheckpointError(f"a LAION PANN checkpoint needs conv_block1..{BLOCKS}; conv_block{missing[0]} is "
                              "missing (only CNN14 is supported, not Cnn6/Cnn10)")
    channels = [int(state[f"{enc}conv_block{i}.conv1.weight"].shape[0]) for i in range(1, BLOCKS + 1)]
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
