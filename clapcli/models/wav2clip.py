"""Wav2CLIP: the released `Wav2CLIP.pt` layout, and the lazily loaded CLIP text tower.

`Wav2CLIP.pt` (descriptinc/lyrebird-wav2clip, release v0.1.0-alpha) is a flat state dict:

    audio_encoder.conv1.weight, audio_encoder.bn1.*, audio_encoder.layer{1-4}.{0,1}.*   the ResNet-18
    audio_encoder.spectrogram.window     (512,) the torchaudio Spectrogram's periodic Hann window (a buffer)
    audio_encoder.fc.{weight,bias}       the pretraining classifier, unused by the original's forward
    audio_transform.sequential.{0,3}.*   the audio head: Linear → ReLU → Dropout → Linear

plus, in training checkpoints, `image_transform.*` and the losses' `logit_scale`s, which the original's
loader ignores too. Keys map 1:1 onto ours (`audio_model.audio_encoder.*`, `audio_projection.linear{1,2}.*`);
the window is checked against ours and dropped, `fc` is dropped, everything else must match exactly.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, WeightsNotAvailable, first_line
from .config import AudioConfig, ClapConfig
from .presets import preset
from .pretrained import from_pretrained

CLIP_LOGIT_SCALE = 100.0  # CLIP's trained logit scale: tagging multiplies cosines by it before the softmax

_WINDOW_KEY = "audio_encoder.spectrogram.window"
_DROPPED = re.compile(r"^audio_encoder\.fc\.")  # the pretraining classifier
_TRAINING_ONLY = re.compile(r"^(image_transform\.|loss_fn(_[ai])?\.)")  # what the original's loader skips too
_HEAD = {"0": "linear1", "3": "linear2"}  # MLPLayers index → Projection layer


def is_wav2clip_state(state: dict) -> bool:
    """True for the released Wav2CLIP layout (no LAION `audio_branch`/`text_branch` keys)."""
    keys = [k.removeprefix("module.") for k in state]
    return any(k.startswith(("audio_encoder.", "audio_transform.")) for k in keys) and not any(
        "audio_branch" in k or "text_branch" in k for k in keys)


def convert_wav2clip_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Original keys → ours; the window buffer checked and dropped, `fc` and training-only keys dropped.
    Keys of no known kind are kept under their own names, so the strict load reports them."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if _DROPPED.match(key) or _TRAINING_ONLY.match(key):
            continue
        if key == _WINDOW_KEY:
            window = torch.hann_window(value.shape[0], periodic=True, dtype=torch.float64)
            if not torch.allclose(value.double(), window, atol=1e-6):
                raise CheckpointError(f"{source}: {key} is not the periodic Hann window the front end uses")
            continue
        if key.startswith("audio_encoder."):
            out["audio_model." + key] = value
        elif m := re.match(r"^audio_transform\.sequential\.(\d+)\.(weight|bias)$", key):
            out[f"audio_projection.{_HEAD.get(m.group(1), 'layer' + m.group(1))}.{m.group(2)}"] = value
        else:
            out[key] = value
    return out


def infer_wav2clip_config(state: dict[str, torch.Tensor], text_tower: str, source: str) -> ClapConfig:
    """The `wav2clip` preset with the widths the state dict (original key names) holds."""
    try:
        width = state["audio_encoder.conv1.weight"].shape[0]
        dim = state["audio_transform.sequential.3.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"{source} looks like a Wav2CLIP checkpoint but has no {exc.args[0]}") from None
    cfg = preset("wav2clip")
    cfg.audio = AudioConfig(encoder="resnet18", resnet_width=int(width))
    cfg.projection_dim = int(dim)
    cfg.text_tower = text_tower
    if _WINDOW_KEY in state:
        cfg.frontend.n_fft = int(state[_WINDOW_KEY].shape[0])
    return cfg


def text_tower_reference(ref: str, base: Path | None = None) -> str:
    """A text tower reference as stored and used: an existing local directory (relative ones first against
    `base`, the model directory, then the working directory) becomes its absolute path; a hub id stays."""
    for candidate in ([base / ref] if base is not None else []) + [Path(ref).expanduser()]:
        if candidate.is_dir():
            return str(candidate.resolve())
    return ref


def stored_text_tower(ref: str, directory: Path) -> str:
    """How save_own records a text tower: relative when it lies inside the model directory (the pair moves
    together), absolute for another local directory, a hub id as it is."""
    local = Path(ref).expanduser()
    if not local.is_dir():
        return ref
    local, directory = local.resolve(), Path(directory).resolve()
    return str(local.relative_to(directory)) if local.is_relative_to(directory) else str(local)


def fingerprint_with_text(weights_fingerprint: str, text_tower: str) -> str:
    """The weights fingerprint of a Wav2CLIP model: its audio weights' and its text tower reference's."""
    return hashlib.blake2b(f"{weights_fingerprint}|text:{text_tower}".encode(), digest_size=8).hexdigest()


def load_clip_text(ref: str, dim: int):
    """(CLIPTextModelWithProjection, tokenizer) from a local directory or a hub id (cache first; a download
    only where the network and HF_HUB_OFFLINE allow it), frozen and in eval mode. Its `text_embeds` must be
    `dim` wide (the audio head's output)."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection
    from transformers.utils import logging as hf_logging

    local = Path(ref).expanduser()
    source = str(local) if local.is_dir() else ref
    attempts = [{}] if local.is_dir() else [{"local_files_only": True}, {}]
    model = tokenizer = None
    last: Exception | None = None
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the middle of a command's output
    hf_logging.set_verbosity_error()  # nor the report of a full CLIP directory's unused vision weights
    try:
        for kwargs in attempts:
            try:
                model = from_pretrained(CLIPTextModelWithProjection, source, "the CLIP text tower", **kwargs)
                tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
                break
            except CheckpointError:
                raise
            except Exception as exc:  # transformers and the hub raise many types for "not there" and "not CLIP"
                last = exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if model is None or tokenizer is None:
        if local.is_dir():
            reason = first_line(last) if last is not None else "no error reported"
            raise CheckpointError(f"cannot load the CLIP text tower in {local}: {reason[:200]}") from last
        raise WeightsNotAvailable(
            f"the CLIP text tower {ref!r} (a Wav2CLIP model's text side) is not in the Hugging Face cache and "
            f"cannot be downloaded here; audio-only use works without it. Fetch it on a connected machine, "
            f"or point the model's config.json \"text_tower\" (or --tokenizer for Wav2CLIP.pt) at a local copy"
        ) from last
    width = model.config.projection_dim
    if width != dim:
        raise CheckpointError(f"the CLIP text tower {ref!r} gives {width}-d text embeddings, but the audio "
                              f"embeddings are {dim}-d")
    model.requires_grad_(False)
    return model.eval(), tokenizer
