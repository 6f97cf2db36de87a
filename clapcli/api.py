"""The public Python API the CLI is written on.

    from clapcli import load_model
    m = load_model("laion/clap-htsat-fused")          # hub id, local directory or LAION .pt
    a = m.embed_audio(["kick.wav", "rain.flac"])       # (2, 512), L2-normalised
    t = m.embed_text(["a kick drum", "rain"])           # (2, 512)
    scores = a @ t.T

Audio rules (see README "How audio is embedded"): decode → mono → 48 kHz → int16 round trip; clips
≤ 10 s are repeat-padded; a fused model embeds a longer file in one pass with feature fusion, an
unfused one as the normalised mean of full-coverage 10 s windows. Files longer than 10 s also get
one embedding per window ("segments"), the last window aligned to the file end.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .audio.decode import load_audio, to_model_rate
from .audio.features import FeatureBuilder, window_starts
from .errors import ClapError
from .identity import fingerprint, model_identity
from .models.checkpoints import LoadedCheckpoint, load_checkpoint, save_own
from .models.registry import DEFAULT_MODEL
from .runtime import autocast, quantize_int8, resolve_device, resolve_precision
from .vectors import l2_normalize

TEXT_CACHE_SIZE = 10_000  # texts kept by Clap.embed_text(cache=True): 2 KB each at 512 dimensions


@dataclass
class Segment:
    start: float  # seconds
    end: float  # seconds
    embedding: np.ndarray  # (D,) L2-normalised


@dataclass
class AudioEmbedding:
    path: str | None
    duration: float  # seconds
    embedding: np.ndarray | None  # (D,) L2-normalised file-level embedding; None on error
    segments: list[Segment] = field(default_factory=list)  # 10 s windows, only for files longer than 10 s
    error: str | None = None
    sample_rate: int | None = None  # of the source file
    channels: int | None = None  # of the source file


class Clap:
    """A loaded model plus its front end, on one device, at one precision.

    Precision int8 quantises the model's Linear layers (both towers and the projections) once, here.
    A model loaded with `text_only=True` embeds text only (see `load_model`)."""

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, precision: str):
        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        if precision == "int8":
            quantize_int8(self.model)
        self.tokenizer = loaded.tokenizer
        self.config = self.model.config
        self.device = device
        self.precision = precision
        self._features: FeatureBuilder | None = None
        self._text_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # text → embedding, least recent first

    @property
    def text_only(self) -> bool:
        """True when only the text half of the checkpoint was loaded (`load_model(..., text_only=True)`)."""
        return not hasattr(self.model, "encode_audio")

    @property
    def features(self) -> FeatureBuilder:
        """The audio front end, built on first use (a text-only caller never needs it)."""
        if self._features is None:
            if self.text_only:
                raise ClapError(f"{self.name} was loaded for text only; load it without text_only to embed audio")
            self._features = FeatureBuilder(self.config.frontend, self.config.fused, self.device)
        return self._features

    # ---- identity -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def model_ref(self) -> str:
        """How to load this model again: the hub id / registry name, or the absolute local path."""
        local = Path(self.loaded.name).expanduser()
        return str(local.resolve()) if local.exists() else self.loaded.name

    @property
    def dim(self) -> int:
        return self.config.projection_dim

    @property
    def fused(self) -> bool:
        return self.config.fused

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale_a.detach().exp())

    @property
    def identity_dict(self) -> dict:
        """What must match for two embeddings to be comparable (weights, front end, dim), plus `model_ref`.

        The index stores this dict; see `clapcli.identity`."""
        return model_identity(self.model_ref, self.loaded.fingerprint, self.config.frontend.settings(),
                              self.fused, self.dim)

    @property
    def fingerprint(self) -> str:
        """Short hash of the weights, front end and dim: the same for a copy of the model loaded from
        elsewhere. Keys the label-embedding cache; classifiers and training runs record it."""
        return fingerprint(self.identity_dict)

    # ---- text ------------------------------------------------------------------------------------------
    def embed_text(self, texts: Sequence[str], batch_size: int = 64, cache: bool = False) -> np.ndarray:
        """(N, D) L2-normalised text embeddings. With `cache`, texts embedded before (with cache) come from an
        in-process cache of the last TEXT_CACHE_SIZE texts instead of the model: for a process answering many
        queries (`clap search --stdin`)."""
        if isinstance(texts, str):
            texts = [texts]
        if not cache:
            return self._embed_text(texts, batch_size)
        new = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        found = dict(zip(new, self._embed_text(new, batch_size))) if new else {}
        for t in texts:
            found.setdefault(t, self._text_cache.get(t))
        for t, vector in found.items():
            self._text_cache[t] = vector
            self._text_cache.move_to_end(t)
        while len(self._text_cache) > TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return np.stack([found[t] for t in texts]) if texts else np.zeros((0, self.dim), np.float32)

    @torch.inference_mode()
    def _embed_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        from .models.text import tokenize

        out = []
        for i in range(0, len(texts), batch_size):
            tok = tokenize(self.tokenizer, texts[i : i + batch_size], self.config.text.max_length)
            with self._autocast():
                emb = self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    # ---- audio -----------------------------------------------------------------------------------------
    def embed_audio(self, paths_or_arrays, sample_rate: int | None = None, batch_size: int = 8) -> np.ndarray:
        """File-level embeddings (N, D). Arrays are mono or (T, C) samples at `sample_rate` (default 48 kHz)."""
        items = [paths_or_arrays] if isinstance(paths_or_arrays, (str, os.PathLike, np.ndarray)) else paths_or_arrays
        waves = []
        for item in items:
            if isinstance(item, (str, os.PathLike)):
                waves.append(load_audio(item, self.config.frontend.sample_rate, self.config.frontend.quantize_int16))
            else:
                sr = sample_rate or self.config.frontend.sample_rate
                waves.append(to_model_rate(np.asarray(item, dtype=np.float32), sr,
                                           self.config.frontend.sample_rate, self.config.frontend.quantize_int16))
        embs = self.embed_waveforms(waves, segments=False, batch_size=batch_size)
        return np.stack([e.embedding for e in embs]) if embs else np.zeros((0, self.dim), np.float32)

    def embed_waveforms(
        self,
        waves: Sequence[np.ndarray],
        segments: bool = True,
        batch_size: int = 8,
        crop_starts: Sequence[tuple[int, int, int] | None] | None = None,
        normalize: bool = True,
    ) -> list[AudioEmbedding]:
        """48 kHz mono (already quantised) waveforms → file embeddings and, if asked, window segments.

        `normalize=False` gives the raw projection outputs (a trained classifier head's input); an unfused
        long file's embedding is then the plain mean of its windows."""
        sr, clip = self.config.frontend.sample_rate, self.config.frontend.clip_samples
        # Every forward pass is a "job": (wave index, kind, samples, crop starts); kind is "file" or a window start.
        jobs: list[tuple[int, object, np.ndarray, tuple | None]] = []
        for i, wave in enumerate(waves):
            n = len(wave)
            if n == 0:
                raise ClapError("cannot embed an empty waveform")
            long = n > clip
            if self.fused or not long:
                jobs.append((i, "file", wave, crop_starts[i] if crop_starts else None))
            if long and (segments or not self.fused):
                for start in window_starts(n, clip):
                    jobs.append((i, start, wave[start : start + clip], None))
        vectors = self._run_jobs(jobs, batch_size, normalize)
        results = [AudioEmbedding(None, len(w) / sr, None) for w in waves]
        windows: dict[int, list[tuple[int, np.ndarray]]] = {}
        for (i, kind, _, _), vec in zip(jobs, vectors):
            if kind == "file":
                results[i].embedding = vec
            else:
                windows.setdefault(i, []).append((kind, vec))
        for i, wins in windows.items():
            if results[i].embedding is None:  # unfused long file: mean of normalised windows, renormalised
                mean = np.mean([v for _, v in wins], axis=0)
                results[i].embedding = l2_normalize(mean) if normalize else mean.astype(np.float32)
            if segments:
                results[i].segments = [Segment(s / sr, min(s + clip, len(waves[i])) / sr, v) for s, v in wins]
        return results

    @torch.inference_mode()
    def _run_jobs(self, jobs, batch_size: int, normalize: bool = True) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b : b + batch_size]
            feats, longer = self.features.clip_features([j[2] for j in chunk], [j[3] for j in chunk])
            with self._autocast():
                emb = self.model.encode_audio(feats, longer, normalize=normalize)
            out.extend(emb.float().cpu().numpy())
        return out

    def embed_files(
        self,
        paths: Iterable[str | os.PathLike],
        batch_size: int = 8,
        segments: bool = True,
        workers: int = 0,
        on_error: Callable[[str, str], None] | None = None,
        normalize: bool = True,
    ) -> Iterator[AudioEmbedding]:
        """Decode (in `workers` DataLoader processes when > 0) and embed, yielding one result per path, in order.

        A file that cannot be decoded, or whose forward pass fails (say, out of memory on a very long file),
        yields an AudioEmbedding with `error` set; the run goes on. `normalize` as in `embed_waveforms`."""
        from .audio.loader import iter_decoded

        pending: list = []

        def embed(decoded: list) -> list[AudioEmbedding]:
            waves = [d.samples for d in decoded]
            try:
                return self.embed_waveforms(waves, segments=segments, batch_size=batch_size, normalize=normalize)
            except (RuntimeError, ValueError, MemoryError) as exc:
                if len(decoded) == 1:
                    decoded[0].error = f"cannot embed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                    return []
                return [e for d in decoded for e in embed([d])]  # find the file at fault, keep the rest

        def flush():
            it = iter(embed([d for d in pending if d.error is None]))
            for d in pending:
                if d.error is not None:
                    if on_error:
                        on_error(d.path, d.error)
                    yield AudioEmbedding(d.path, 0.0, None, error=d.error)
                else:
                    e = next(it)
                    e.path, e.sample_rate, e.channels = d.path, d.sample_rate, d.channels
                    yield e
            pending.clear()

        sr, quantize = self.config.frontend.sample_rate, self.config.frontend.quantize_int16
        for decoded in iter_decoded(paths, sr, quantize, workers):
            pending.append(decoded)
            if len(pending) >= batch_size:
                yield from flush()
        if pending:
            yield from flush()

    # ---- misc ------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.precision)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the project's own format: config.json + model.safetensors + tokenizer files."""
        if self.text_only or self.precision == "int8":
            raise ClapError("only a whole model at full precision can be saved (this one is "
                            f"{'text only' if self.text_only else 'int8-quantised'})")
        return save_own(self.model, self.tokenizer, directory, {"source": self.loaded.name})


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str = "auto",
    precision: str = "auto",
    tokenizer: str | None = None,
    text_only: bool = False,
) -> Clap:
    """Load a model: a hub id (default `laion/clap-htsat-fused`), a local directory, or an original .pt.

    precision: auto (bf16 where native, else fp32), fp32, bf16 or int8 (CPU: dynamic int8 Linear layers,
    within cosine 0.995 of fp32). text_only: read and build only the text tower and projection (no
    transformers import, the audio weights never read) where the checkpoint allows it (a Hugging Face or
    clapcli directory with a RoBERTa/BERT tower and a tokenizer.json); elsewhere the whole model loads."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    ref = name_or_path or os.environ.get("CLAP_MODEL") or DEFAULT_MODEL
    loaded = None
    if text_only:
        from .models.text_only import load_text_checkpoint

        loaded = load_text_checkpoint(ref, tokenizer=tokenizer)
    if loaded is None:
        loaded = load_checkpoint(ref, tokenizer=tokenizer)
    return Clap(loaded, dev, prec)


def load_classifier(directory: str | os.PathLike, model: Clap | None = None, device: str = "auto",
                    precision: str = "auto"):
    """Load a classifier written by `clap finetune` (see `clapcli.models.classifier`), with its base model
    (or the finetuned one it saved) unless `model` is given; a `model` with other weights is refused."""
    from .models.classifier import load_classifier as _load

    return _load(directory, model=model, device=device, precision=precision)
