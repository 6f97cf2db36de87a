"""Known released models: where they live and what they are. Data, not code paths."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..atomic import atomic_write
from ..errors import CheckpointError, WeightsNotAvailable

DEFAULT_MODEL = "laion/clap-htsat-fused"


def default_model() -> str:
    """The model a command uses when none is named: $CLAP_MODEL, else DEFAULT_MODEL."""
    return os.environ.get("CLAP_MODEL") or DEFAULT_MODEL

WAV2CLIP_URL = "https://github.com/descriptinc/lyrebird-wav2clip/releases/download/v0.1.0-alpha/Wav2CLIP.pt"
# Upstream publishes no checksum for Wav2CLIP.pt (none in the release, the wav2clip package or any project found
# to pin it), and none could be computed offline: left unpinned, a download is held only to what every .pt is
# (weights_only=True, strict keys and shapes). Set it to a hex digest to check every download against it.
WAV2CLIP_SHA256: str | None = None


# Hub ids of text towers and tokenizers, written here once.
ROBERTA_TOKENIZER = "FacebookAI/roberta-base"  # every released checkpoint's (original .pt files carry none)
BERT_TOKENIZER = "google-bert/bert-base-uncased"  # LAION's BERT tower (the hub's name for bert-base-uncased)
CLIP_TEXT_TOWER = "openai/clip-vit-base-patch32"  # CLIP ViT-B/32: Wav2CLIP's text side, a CLIP tower's tokenizer


@dataclass(frozen=True)
class KnownModel:
    name: str  # what users type: a hub id, or a LAION file name without .pt
    repo: str  # Hugging Face repository holding the weights
    filename: str | None  # a single original .pt inside `repo`; None for a transformers directory
    architecture: str  # audio encoder size
    fused: bool  # feature fusion for > 10 s input
    dim: int  # joint embedding width
    note: str = ""
    url: str | None = None  # a single file downloaded from this URL (not the hub) into the torch hub cache
    sha256: str | None = None  # hex SHA-256 of the file at `url`, checked before the download is kept
    text_tower: str | None = None  # a separately loaded text tower (hub id) that `clap models pull` also caches


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in [
        KnownModel("laion/clap-htsat-fused", "laion/clap-htsat-fused", None, "HTSAT-tiny", True, 512,
                   "default; converted from 630k-audioset-fusion-best.pt"),
        KnownModel("laion/clap-htsat-unfused", "laion/clap-htsat-unfused", None, "HTSAT-tiny", False, 512,
                   "converted from 630k-audioset-best.pt"),
        KnownModel("laion/larger_clap_general", "laion/larger_clap_general", None, "HTSAT-base", False, 512,
                   "general audio, music and speech"),
        KnownModel("laion/larger_clap_music_and_speech", "laion/larger_clap_music_and_speech", None,
                   "HTSAT-base", False, 512, "music and speech"),
        KnownModel("laion/larger_clap_music", "laion/larger_clap_music", None, "HTSAT-base", False, 512,
                   "text tower reported near-constant upstream; prefer larger_clap_general"),
        KnownModel("630k-audioset-fusion-best", "lukewys/laion_clap", "630k-audioset-fusion-best.pt",
                   "HTSAT-tiny", True, 512, "original LAION checkpoint"),
        KnownModel("630k-audioset-best", "lukewys/laion_clap", "630k-audioset-best.pt", "HTSAT-tiny", False, 512,
                   "original LAION checkpoint"),
        KnownModel("630k-fusion-best", "lukewys/laion_clap", "630k-fusion-best.pt", "HTSAT-tiny", True, 512,
                   "original LAION checkpoint"),
        KnownModel("630k-best", "lukewys/laion_clap", "630k-best.pt", "HTSAT-tiny", False, 512,
                   "original LAION checkpoint"),
        KnownModel("music_audioset_epoch_15_esc_90.14", "lukewys/laion_clap",
                   "music_audioset_epoch_15_esc_90.14.pt", "HTSAT-base", False, 512, "original LAION checkpoint"),
        KnownModel("music_speech_epoch_15_esc_89.25", "lukewys/laion_clap",
                   "music_speech_epoch_15_esc_89.25.pt", "HTSAT-base", False, 512, "original LAION checkpoint"),
        KnownModel("music_speech_audioset_epoch_15_esc_89.98", "lukewys/laion_clap",
                   "music_speech_audioset_epoch_15_esc_89.98.pt", "HTSAT-base", False, 512,
                   "original LAION checkpoint"),
        KnownModel("wav2clip", "descriptinc/lyrebird-wav2clip", "Wav2CLIP.pt", "ResNet-18", False, 512,
                   "Wav2CLIP (16 kHz); text: CLIP ViT-B/32's text tower, loaded on first text use",
                   url=WAV2CLIP_URL, sha256=WAV2CLIP_SHA256, text_tower=CLIP_TEXT_TOWER),
    ]
}



def lookup(name: str) -> KnownModel | None:
    key = name[:-3] if name.endswith(".pt") else name
    return KNOWN_MODELS.get(key)


def hint(name: str) -> str:
    return (
        f"weights for {name!r} are not in the Hugging Face cache and cannot be downloaded here; "
        f"run `clap models pull {name}` on a connected machine (the cache is $HF_HOME, "
        f"~/.cache/huggingface by default), or pass --model PATH to a local copy"
    )


def fetch(name: str, download: bool) -> str:
    """Local path of a known model (directory or .pt), from the cache or, if allowed, the hub."""
    from huggingface_hub import hf_hub_download, snapshot_download

    known = lookup(name)
    if known is not None and known.url:
        return _fetch_url(known, download)
    repo = known.repo if known else name
    filename = known.filename if known else None
    attempts = [True, False] if download else [True]
    last: Exception | None = None
    for local_only in attempts:
        try:
            if filename:
                return hf_hub_download(repo, filename, local_files_only=local_only)
            return snapshot_download(
                repo,
                local_files_only=local_only,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer*", "vocab*", "merges*"],
            )
        except Exception as exc:  # the hub raises many types for "not cached" and "no network"
            last = exc
    raise WeightsNotAvailable(hint(name)) from last


def _fetch_url(known: KnownModel, download: bool) -> str:
    """A single-file model from a plain URL, cached where torch.hub keeps downloads ($TORCH_HOME/hub/checkpoints,
    the original package's own cache, so a copy it fetched is found)."""
    from pathlib import Path

    import torch

    target = Path(torch.hub.get_dir()) / "checkpoints" / known.filename
    if target.is_file():
        return str(target)
    hint_text = (f"weights for {known.name!r} are not cached ({target}) and cannot be downloaded here; run "
                 f"`clap models pull {known.name}` on a connected machine or download {known.url} and pass "
                 f"--model PATH/{known.filename}")
    if not download:
        raise WeightsNotAvailable(hint_text)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(target, writer=lambda tmp: download_verified(known.url, tmp, known.sha256))
    except CheckpointError:
        raise
    except Exception as exc:  # URLError, HTTPError, OSError, ...
        raise WeightsNotAvailable(hint_text) from exc
    return str(target)


def download_verified(url: str, path, sha256: str | None) -> str:
    """Stream `url` into `path`, hashing as it is written; returns the hex SHA-256. With `sha256` given, another
    digest is a CheckpointError (the caller's atomic write then deletes the file: it never takes the cached
    file's place)."""
    import hashlib
    import urllib.request

    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": "clapcli"})
    with urllib.request.urlopen(request, timeout=60) as response, open(path, "wb") as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
    if sha256 is not None and digest.hexdigest() != sha256.lower():
        raise CheckpointError(f"the download of {url} has SHA-256 {digest.hexdigest()}, not the published "
                              f"{sha256.lower()}: not kept (a damaged or replaced file); try again later")
    return digest.hexdigest()


def is_cached(name: str) -> bool:
    try:
        fetch(name, download=False)
        return True
    except WeightsNotAvailable:
        return False
