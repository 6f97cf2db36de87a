"""Models loaded through transformers' `from_pretrained`, held to safetensors.

Left to itself, transformers falls back to a pickled `pytorch_model.bin` when a model has no safetensors
weights, and unpickling can run code. Every tower clap loads that way (`clap train --text-model`, `clap shards
make --k2c-model`, `clap train --teacher`, a Wav2CLIP model's CLIP text tower) goes through `from_pretrained`
here: `use_safetensors=True`, and a model that has only pickled weights is a one-line `CheckpointError`
saying so, instead of transformers' "no file named model.safetensors".
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def from_pretrained(cls, source: str, what: str, **kwargs):
    """`cls.from_pretrained(source, use_safetensors=True, **kwargs)`; `what` names the option in errors."""
    try:
        return cls.from_pretrained(source, use_safetensors=True, **kwargs)
    except Exception as exc:
        if has_only_pickled_weights(source):
            raise CheckpointError(
                f"{what} {source} has only pickled weights (pytorch_model.bin), which clap does not load: "
                "unpickling can run code. Use a copy with model.safetensors (transformers' save_pretrained "
                "writes one)") from exc
        raise


def has_only_pickled_weights(source: str) -> bool:
    """Whether `source` (a local directory, or a hub id in the Hugging Face cache) holds a pytorch_model.bin
    and no *.safetensors weights."""
    local = Path(source).expanduser()
    if local.is_dir():
        return (any(local.glob("*.bin")) or (local / PICKLED_WEIGHTS[1]).is_file()) \
            and not any(local.glob("*.safetensors"))
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(source, name), str)
        except Exception:  # noqa: BLE001 - not a valid repo id: nothing of it is cached
            return False

    return any(cached(n) for n in PICKLED_WEIGHTS) and not any(
        cached(n) for n in ("model.safetensors", "model.safetensors.index.json"))
