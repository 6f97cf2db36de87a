"""`Clap`: a loaded model plus its front end, on one device, at one precision; what the CLI and the library
embed with. Load one with `clapcli.load_model` (`clapcli.engine.load`).

Window models (CLAP) stream files through `clapcli.engine.streaming`; Wav2CLIP models embed whole clips
through `clapcli.engine.whole_clip`."""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..audio.decode import load_audio, to_model_rate
from ..audio.features import FeatureBuilder, window_starts
from ..errors import ClapError
from ..identity import fingerprint, model_identity
from ..models.checkpoints import save_own
from ..models.weights import LoadedCheckpoint
from ..records import AudioEmbedding
from ..runtime import autocast, quantize_int8
from . import streaming, whole_clip
from .streaming import file_level

TEXT_CACHE_SIZE = 10_000  # texts kept by Clap.embed_text(cache=True): 2 KB each at 512 dimensions


class Clap:
    """A loaded model plus its front end, on one device, at one precision.

    Precision int8 quantises the model's Linear layers (both towers and the projections) once, here; a
    Wav2CLIP model's CLIP text tower, loaded lazily on first use, stays fp32.
    A model loaded with `text_only=True` embeds text only (see `load_model`)."""

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, precision: str, engine: str | None = None):
        from ..models.onnx_audio import OnnxHTSAT, resolve_engine

        self.loaded = loaded
        self.model = loaded.model.to(device).eval()
        encoder = getattr(getattr(self.model, "audio_model", None), "audio_encoder", None)
        self.engine = resolve_engine(engine, device, encoder, precision)
        if self.engine == "onnx":  # the audio encoder runs in onnxruntime (fp32 or its own int8), the rest in torch
            self.model.audio_runner = OnnxHTSAT(encoder, loaded.fingerprint, precision)
        if precision == "int8":
            parts = [self.model] if self.engine == "torch" else [
                m for m in (self.model.text_model, self.model.text_projection, self.model.audio_projection) if m]
            for part in parts:
                quantize_int8(part)
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
        from ..models.text import tokenize

        tokenizer = self.tokenizer if self.tokenizer is not None else self.model.text_tokenizer()  # Wav2CLIP: lazy
        out = []
        for i in range(0, len(texts), batch_size):
            tok = tokenize(tokenizer, texts[i : i + batch_size], self.config.text.max_length)
            with self._autocast():
                emb = self.model.encode_text(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
            out.append(emb.float().cpu().numpy())
        return np.concatenate(out)

    # ---- audio -----------------------------------------------------------------------------------------
    def embed_audio(self, paths_or_arrays, sample_rate: int | None = None, batch_size: int = 8) -> np.ndarray:
        """File-level embeddings (N, D). Arrays are mono or (T, C) samples at `sample_rate` (default: the model's,
        48 kHz for CLAP, 16 kHz for Wav2CLIP)."""
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
        long file's embedding is then the plain mean of its windows. Wav2CLIP models (a "linear" front end)
        embed each whole clip instead: see `clapcli.engine.whole_clip`."""
        if self.config.frontend.kind == "linear":
            return whole_clip.embed_whole_clips(self, waves, segments, batch_size, normalize)
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
        norms: list[float | None] = []
        vectors = self._run_jobs(jobs, batch_size, normalize, norms if normalize else None)
        norms = norms or [None] * len(vectors)
        results = [AudioEmbedding(None, len(w) / sr, None) for w in waves]
        windows: dict[int, list[tuple[int, np.ndarray, float | None]]] = {}
        for (i, kind, _, _), vec, norm in zip(jobs, vectors, norms):
            if kind == "file":
                results[i].embedding, results[i].norm = vec, norm
            else:
                windows.setdefault(i, []).append((kind, vec, norm))
        for i, wins in windows.items():
            results[i].embedding, results[i].segments = file_level(results[i].embedding, wins, len(waves[i]), sr,
                                                                   clip, segments, normalize)
        return results

    @torch.inference_mode()
    def _run_jobs(self, jobs, batch_size: int, normalize: bool = True,
                  norms: list[float] | None = None) -> list[np.ndarray]:
        """Jobs (wave index, kind, samples or a ready `FusionStack`, crop starts) -> one vector each. With `norms`
        (and `normalize`), the L2 norm of each raw projection output is appended to it (what the index stores for
        classifier heads)."""
        out: list[np.ndarray] = []
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b : b + batch_size]
            feats, longer = self._job_features(chunk)
            with self._autocast():
                emb = self.model.encode_audio(feats, longer, normalize=normalize and norms is None)
                if normalize and norms is not None:  # the same normalisation encode_audio applies
                    norms.extend(emb.norm(dim=-1).tolist())
                    emb = torch.nn.functional.normalize(emb, dim=-1)
            out.extend(emb.float().cpu().numpy())
        return out

    def _job_features(self, chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs of a chunk of jobs: waveforms through the feature builder, fusion stacks as they are."""
        from ..audio.stream import FusionStack

        ready = [k for k, j in enumerate(chunk) if isinstance(j[2], FusionStack)]
        if not ready:
            return self.features.clip_features([j[2] for j in chunk], [j[3] for j in chunk])
        waves = [k for k in range(len(chunk)) if k not in ready]
        first = chunk[ready[0]][2].features
        feats = torch.empty(len(chunk), *first.shape, device=self.device)  # (B, 4, frames, mels)
        longer = torch.zeros(len(chunk), dtype=torch.bool, device=self.device)
        if waves:
            f, lo = self.features.clip_features([chunk[k][2] for k in waves], [chunk[k][3] for k in waves])
            feats[waves], longer[waves] = f, lo
        for k in ready:
            feats[k] = chunk[k][2].features.to(self.device)
            longer[k] = chunk[k][2].longer
        return feats, longer

    def embed_files(
        self,
        paths: Iterable[str | os.PathLike],
        batch_size: int = 8,
        segments: bool = True,
        workers: int = 0,
        on_error: Callable[[str, str], None] | None = None,
        normalize: bool = True,
        on_audio: Callable[[str, float, float], None] | None = None,
    ) -> Iterator[AudioEmbedding]:
        """Decode (in `workers` DataLoader processes when > 0) and embed, yielding one result per path, in order.

        Files are streamed (`clapcli.audio.stream`): decoded, resampled and cut into 10 s windows block by
        block, windows embedded in batches as they complete, so memory does not grow with a file's length;
        the results equal `embed_waveforms` on the whole decoded file. A file that cannot be decoded, or whose
        forward pass fails (say, out of memory), yields an AudioEmbedding with `error` set; the run goes on. A
        file whose stream breaks off is embedded from what decodes, with `partial` saying why.
        `on_audio(path, seconds, expected_seconds)` reports audio as it is decoded, within long files too
        (`expected_seconds`: the file's length by its header). `normalize` as in `embed_waveforms`."""
        embedder = whole_clip if self.config.frontend.kind == "linear" else streaming  # Wav2CLIP: decoded whole
        yield from embedder.embed_files(self, paths, batch_size, segments, workers, on_error, normalize, on_audio)

    # ---- misc ------------------------------------------------------------------------------------------
    def _autocast(self):
        return autocast(self.device, self.precision)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the project's own format: config.json + model.safetensors + tokenizer files."""
        if self.text_only or self.precision == "int8":
            raise ClapError("only a whole model at full precision can be saved (this one is "
                            f"{'text only' if self.text_only else 'int8-quantised'})")
        return save_own(self.model, self.tokenizer, directory, {"source": self.loaded.name})

