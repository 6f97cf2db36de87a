"""Which model made an embedding: the one model identity and fingerprint, for every store of embeddings.

Two embeddings are comparable when the weights, the audio front end and the embedding size are the
same; where the model was loaded from (hub id, directory, moved copy) does not matter. The identity
dict names all of that plus, for messages and for loading the model again, the load reference:

    {"model": "/models/my-clap", "weights": "9f0c…", "frontend": {...}, "fused": true, "dim": 512}

`fingerprint(identity)` is the short hash of everything but the name. The index stores the dict (its
format is unchanged, so existing indexes keep working) and `same_model` compares two of them; the
label-embedding cache is keyed by the fingerprint; classifiers and training runs record it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

NAME_KEYS = ("model", "name")  # entries that say where a model came from, not what it computes
FINGERPRINT_HEX = 16  # hex digits kept of the sha256: 64 bits


def model_identity(name: str, weights: str, frontend: Mapping[str, Any], fused: bool, dim: int) -> dict:
    """The identity dict of a model: load reference, weights hash, front-end settings, fused, dim."""
    return {"model": name, "weights": weights, "frontend": dict(frontend), "fused": bool(fused), "dim": int(dim)}


def fingerprint(identity: Mapping[str, Any]) -> str:
    """Short hex sha256 of the canonical JSON of `identity` without its name entries."""
    what = {k: v for k, v in identity.items() if k not in NAME_KEYS}
    canonical = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:FINGERPRINT_HEX]


def same_model(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """True when two identity dicts describe the same weights, front end and dim, whatever their names."""
    return fingerprint(a) == fingerprint(b)


def weights_fingerprint(path) -> str:
    """Hash of size + first and last 4 MiB of each weights file (a file, or a directory's *.safetensors):
    cheap, and changes with any re-save. Needs no torch: a text search checks its cached query graph with it."""
    import os
    from pathlib import Path

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    h = hashlib.blake2b(digest_size=8)
    for f in files:
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(4 << 20))
            if size > 8 << 20:
                fh.seek(-(4 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()

