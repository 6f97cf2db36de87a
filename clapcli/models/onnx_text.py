"""A text query without torch: the text tower + projection exported once to ONNX, run by onnxruntime.

    save_text_query(clap)                 # after `clap index` (torch loaded anyway): graph + tokenizer + identity
    q = load_text_query("laion/clap-htsat-fused")   # later, in a fresh `clap search`: no torch import at all
    q.embed_text(["rain on a roof"])      # (1, D) float32, L2-normalised, equal to Clap.embed_text to ~1e-6

Why: a cold text search spends most of its time importing torch (~3-4 s of ~6 s on a 2-core CPU); with a
saved query graph it imports numpy, tokenizers and onnxruntime only.

What is cached, under `cache_dir()/onnx/`, keyed by the weights fingerprint (the same cheap hash the
checkpoint loader records, computed here from the files without torch), the tokenizer and config files
beside them (SIDE_FILES), the clapcli version and EXPORT_VERSION:
`text-KEY.onnx` (token ids + attention mask → normalised embedding, batch and length free),
`text-KEY.tokenizer.json` (the model's tokenizers tokenizer) and `text-KEY.json` (its identity dict without
the load reference, the pad token and the tower's max length). The three are written atomically, the
sidecar last, so a reader finds all three or none. A model whose files change gets another key; `clap search`
also falls back to the model when the saved identity does not match the index's.

The graph is always fp32 (`clap index` at int8 loads the text half again at fp32 to export it). Only an fp32 query
on the CPU takes this path; anything it cannot answer (no saved graph, a
model that is not a local directory or a cached hub snapshot) returns None and the caller loads the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..atomic import atomic_write
from ..errors import ClapError
from ..home import cache_dir
from ..identity import fingerprint, weights_fingerprint
from ..version import __version__
from . import registry

log = logging.getLogger(__name__)

EXPORT_VERSION = 1


# The files beside the weights that the query depends on (tokenizer, text config, the front-end settings in
# the stored identity): a change to any of them is another key, as a change to the weights is.
SIDE_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")


def _key(path: Path) -> str:
    h = hashlib.blake2b(f"text|{weights_fingerprint(path)}|{EXPORT_VERSION}|{__version__}".encode(), digest_size=10)
    folder = path if path.is_dir() else path.parent
    for name in SIDE_FILES:
        side = folder / name
        if side.is_file():
            h.update(name.encode() + hashlib.blake2b(side.read_bytes(), digest_size=16).digest())
    return h.hexdigest()


def _files(path: Path) -> tuple[Path, Path, Path]:
    base = cache_dir() / "onnx" / f"text-{_key(Path(path))}"
    return base.with_suffix(".onnx"), base.with_suffix(".tokenizer.json"), base.with_suffix(".json")


def _resolve(ref: str) -> Path | None:
    """The local weights of `ref` (a path, or a hub id / registry name already in the cache), else None."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    try:
        return Path(registry.fetch(ref, download=False))
    except (ClapError, OSError, ValueError):
        return None


def _backend_tokenizer(tokenizer):
    """The `tokenizers.Tokenizer` behind a model's tokenizer (ours or a transformers fast one), else None."""
    inner = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "backend_tokenizer", None)
    return inner if inner is not None and hasattr(inner, "to_str") else None


def can_save(clap) -> bool:
    """Whether `clap` has a text tower and tokenizer the query graph covers (not Wav2CLIP's CLIP tower, not a
    slow tokenizer), whatever its precision and device."""
    return getattr(clap.model.config, "text_tower", None) is None and _backend_tokenizer(clap.tokenizer) is not None


def save_text_query(clap) -> Path | None:
    """Export `clap`'s text tower and projection (fp32, eval) for torch-free queries; returns the graph's path,
    or None where this model has no such tower or tokenizer (Wav2CLIP's CLIP tower, a slow tokenizer) or is not
    fp32 on the CPU (load its text half again for that: `load_model(ref, "cpu", "fp32", text_only=True)`)."""
    import torch

    if not can_save(clap) or not clap.loaded.source:
        return None
    graph, tok_file, meta = _files(Path(clap.loaded.source))
    if meta.is_file() and graph.is_file() and tok_file.is_file():
        return graph
    if clap.precision != "fp32" or clap.device.type != "cpu":
        return None  # the caller loads the text half again at fp32 (`clap index` does)
    model, tok = clap.model, _backend_tokenizer(clap.tokenizer)
    pad = getattr(clap.tokenizer, "pad_token_id", None)
    if pad is None or getattr(model, "text_model", None) is None:  # (can_save saw the tokenizer)
        return None
    graph.parent.mkdir(parents=True, exist_ok=True)

    class Query(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clap = model

        def forward(self, input_ids, attention_mask):
            return self.clap.encode_text(input_ids, attention_mask)

    ids = torch.tensor([[0, 5, 6, 2], [0, 7, 2, pad]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atomic_write(graph, writer=lambda tmp: torch.onnx.export(
            Query().eval(), (ids, mask), str(tmp), input_names=["input_ids", "attention_mask"],
            output_names=["embedding"], dynamic_axes=axes, opset_version=17, dynamo=False))
    atomic_write(tok_file, tok.to_str())
    identity = {k: v for k, v in clap.identity_dict.items() if k != "model"}
    atomic_write(meta, json.dumps({"identity": identity, "pad_token_id": int(pad),
                                   "max_length": int(model.config.text.max_length), "name": clap.name}))
    log.info("saved a torch-free text query graph: %s", graph)
    return graph


class OnnxTextQuery:
    """Embeds text like `Clap.embed_text` (fp32), from the saved graph; the surface `clap search` uses."""

    precision = "fp32"
    engine = "onnx"
    text_only = True

    def __init__(self, name: str, path: Path, graph: Path, tokenizer_file: Path, meta: dict, threads: int | None):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.name, self._path = name, path
        self._meta = meta
        self._tok = Tokenizer.from_file(str(tokenizer_file))
        self._tok.enable_truncation(int(meta["max_length"]))
        self._tok.enable_padding(pad_id=int(meta["pad_token_id"]))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._cache: dict[str, np.ndarray] = {}

    @property
    def model_ref(self) -> str:
        return str(self._path.resolve()) if Path(self.name).expanduser().exists() else self.name

    @property
    def identity_dict(self) -> dict:
        return {"model": self.model_ref, **self._meta["identity"]}

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity_dict)

    @property
    def dim(self) -> int:
        return int(self._meta["identity"]["dim"])

    def embed_text(self, texts: Sequence[str], batch_size: int = 64, cache: bool = False) -> np.ndarray:
        texts = list(texts)
        todo = [t for t in dict.fromkeys(texts) if not (cache and t in self._cache)]
        fresh = {}
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            encoded = self._tok.encode_batch(chunk)
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            (out,) = self._session.run(None, {"input_ids": ids, "attention_mask": mask})
            fresh.update(zip(chunk, out.astype(np.float32)))
        if cache:
            self._cache.update(fresh)
            fresh = {t: self._cache[t] for t in texts}
        return np.stack([fresh[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


def load_text_query(ref: str, threads: int | None = None) -> OnnxTextQuery | None:
    """The saved query graph of `ref`'s weights, or None (no onnxruntime, no saved graph, not resolvable)."""
    from importlib.util import find_spec

    if find_spec("onnxruntime") is None or find_spec("tokenizers") is None:
        return None
    path = _resolve(ref)
    if path is None:
        return None
    try:
        graph, tok_file, meta_file = _files(path)
    except OSError:
        return None
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        return OnnxTextQuery(ref, path, graph, tok_file, meta, threads)
    except Exception as exc:  # noqa: BLE001 - a damaged cache entry: the caller loads the model instead
        log.debug("text query graph of %s not usable (dropped; the next clap index saves it again): %s", ref, exc)
        meta_file.unlink(missing_ok=True)
        return None
