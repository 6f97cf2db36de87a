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
from .errors import ClapError, failure_kind, first_line
from .identity import fingerprint, model_identity
from .models.checkpoints import load_checkpoint, save_own
from .models.classifier import Classifier, read_classifier
from .models.registry import default_model
from .models.weights import LoadedCheckpoint
from .records import AudioEmbedding, Segment
from .runtime import autocast, quantize_int8, resolve_device, resolve_precision
from .vectors import l2_normalize

TEXT_CACHE_SIZE = 10_000  # texts kept by Clap.embed_text(cache=True): 2 KB each at 512 dimensions


WHOLE_CLIP_SECONDS = 300.0  # Wav2CLIP: longest piece of a clip embedded in one pass (README "Wav2CLIP")
SEGMENT_SECONDS = 1.0  # Wav2CLIP: segment (timeline, index window) length
SEGMENT_BATCH = 64  # Wav2CLIP: 1 s segments per forward pass at least (~15 MB of activations at width 64)


@dataclass
class _StreamedFile:
    """What `embed_files` gathers for one file while its pieces stream in."""

    path: str
    vector: np.ndarray | None = None  # the file-level job's output
    windows: list[tuple[int, np.ndarray]] = field(default_factory=list)  # (start sample, vector), in order
    pending: int = 0  # jobs queued but not run
    ended: bool = False
    end: object = None  # the "end" (or "error") piece
    error: str | None = None
    error_kind: str | None = None

    def result(self, sr: int, clip: int, segments: bool, normalize: bool) -> AudioEmbedding:
        if self.error is not None:
            return AudioEmbedding(self.path, 0.0, None, error=self.error, error_kind=self.error_kind)
        n = self.end.samples_total
        embedding, segs = _file_level(self.vector, self.windows, n, sr, clip, segments, normalize)
        return AudioEmbedding(self.path, n / sr, embedding, segs, sample_rate=self.end.sample_rate,
                              channels=self.end.channels, partial=self.end.partial)


def _file_level(vector, windows, n: int, sr: int, clip: int, segments: bool, normalize: bool):
    """(file embedding, segments) of an n-sample file from its file-level vector (None: an unfused long
    file, whose embedding is the mean of its normalised windows, renormalised) and its (start, vector)
    windows."""
    if vector is None:
        mean = np.mean([v for _, v in windows], axis=0)
        vector = l2_normalize(mean) if normalize else mean.astype(np.float32)
    return vector, [Segment(s / sr, min(s + clip, n) / sr, v) for s, v in windows] if segments else []


def _embed_failure(exc: BaseException) -> str:
    """The error recorded for a file whose forward pass failed (say, out of memory on a very long file)."""
    return f"cannot embed: {first_line(exc)}"


class Clap:
    """A loaded model plus its front end, on one device, at one precision.

    Precision int8 quantises the model's Linear layers (both towers and the projections) once, here; a
    Wav2CLIP model's CLIP text tower, loaded lazily on first use, stays fp32.
    A model loaded with `text_only=True` embeds text only (see `load_model`)."""

    def __init__(self, loaded: LoadedCheckpoint, device: torch.device, precision: str, engine: str | None = None):
        from .models.onnx_audio import OnnxHTSAT, resolve_engine

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
        from .models.text import tokenize

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
        embed each whole clip instead: see `_embed_whole_clips`."""
        if self.config.frontend.kind == "linear":
            return self._embed_whole_clips(waves, segments, batch_size, normalize)
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
            results[i].embedding, results[i].segments = _file_level(results[i].embedding, wins, len(waves[i]), sr,
                                                                    clip, segments, normalize)
        return results

    @torch.inference_mode()
    def _run_jobs(self, jobs, batch_size: int, normalize: bool = True) -> list[np.ndarray]:
        """Jobs (wave index, kind, samples or a ready `FusionStack`, crop starts) -> one vector each."""
        out: list[np.ndarray] = []
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b : b + batch_size]
            feats, longer = self._job_features(chunk)
            with self._autocast():
                emb = self.model.encode_audio(feats, longer, normalize=normalize)
            out.extend(emb.float().cpu().numpy())
        return out

    def _job_features(self, chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs of a chunk of jobs: waveforms through the feature builder, fusion stacks as they are."""
        from .audio.stream import FusionStack

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

    # ---- Wav2CLIP: whole clips and 1 s segments ---------------------------------------------------------
    def _embed_whole_clips(self, waves, segments: bool, batch_size: int, normalize: bool) -> list[AudioEmbedding]:
        """Wav2CLIP's utterance mode: each 16 kHz clip whole through the encoder (no padding to a clip
        length, no window mean), then the head. Clips go one at a time, so no clip sees another. A clip
        longer than WHOLE_CLIP_SECONDS is cut into that many equal pieces of at most that length, and its
        pooled encoder output is the duration-weighted mean of theirs (bounded memory). With `segments`, a
        clip longer than SEGMENT_SECONDS also gets full-coverage 1 s windows (the last aligned to the end),
        embedded as 1 s clips: the original's frame-level use."""
        sr = self.config.frontend.sample_rate
        limit, seg = int(WHOLE_CLIP_SECONDS * sr), int(SEGMENT_SECONDS * sr)
        results = []
        for wave in waves:
            n = len(wave)
            if n == 0:
                raise ClapError("cannot embed an empty waveform")
            pieces = -(-n // limit)  # ceil
            bounds = [round(i * n / pieces) for i in range(pieces + 1)]
            pooled = sum((self._encode_pooled(wave[a:b]) * ((b - a) / n) for a, b in zip(bounds, bounds[1:])))
            result = AudioEmbedding(None, n / sr, self._project(pooled, normalize)[0])
            if segments and n > seg:
                starts = window_starts(n, seg)
                per_pass = max(batch_size, SEGMENT_BATCH)
                for b in range(0, len(starts), per_pass):
                    chunk = starts[b : b + per_pass]
                    batch = torch.as_tensor(np.stack([wave[s : s + seg] for s in chunk]), dtype=torch.float32)
                    feats = self.features.frontend(batch.to(self.device))[:, None]  # (S, 1, frames, bins)
                    with torch.inference_mode(), self._autocast():
                        vecs = self._project(self.model.audio_model.audio_encoder(feats), normalize)
                    result.segments += [Segment(s / sr, (s + seg) / sr, v) for s, v in zip(chunk, vecs)]
            results.append(result)
        return results

    @torch.inference_mode()
    def _encode_pooled(self, wave: np.ndarray) -> torch.Tensor:
        """One clip of any length → its pooled encoder output (1, out_width) float32."""
        feats = self.features.whole_clip_features(wave)  # (1, 1, frames, bins)
        with self._autocast():
            return self.model.audio_model.audio_encoder(feats).float()

    @torch.inference_mode()
    def _project(self, pooled: torch.Tensor, normalize: bool) -> list[np.ndarray]:
        """Pooled encoder outputs (B, out_width) → the audio head's (B, D) embeddings, as numpy rows."""
        with self._autocast():
            emb = self.model.audio_projection(pooled).float()
        emb = torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
        return list(emb.cpu().numpy())

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
        if self.config.frontend.kind == "linear":  # Wav2CLIP embeds whole clips: decoded whole
            yield from self._embed_files_whole(paths, batch_size, segments, workers, on_error, normalize, on_audio)
            return
        from .audio.decode import _log_messages
        from .audio.stream import FusionStack, StreamOptions, iter_pieces

        fe = self.config.frontend
        sr, clip = fe.sample_rate, fe.clip_samples
        opts = StreamOptions(sr, fe.quantize_int16, clip, windows=segments or not self.fused, fusion=self.fused,
                             frontend=fe)
        paths = [os.fspath(p) for p in paths]
        files: dict[int, _StreamedFile] = {}
        jobs: list[tuple[int, object, object, None]] = []
        next_out = 0

        def run(batch: list) -> None:
            try:
                vectors = self._run_jobs(batch, len(batch), normalize)
            except (RuntimeError, ValueError, MemoryError) as exc:
                if len(batch) > 1:  # find the file at fault, keep the rest
                    for job in batch:
                        run([job])
                    return
                state = files[batch[0][0]]
                if state.error is None:
                    state.error, state.error_kind = _embed_failure(exc), failure_kind(exc)
                vectors = [None]
            for (i, kind, _, _), vec in zip(batch, vectors):
                state = files[i]
                state.pending -= 1
                if vec is None:
                    continue
                if kind == "file":
                    state.vector = vec
                else:
                    state.windows.append((kind, vec))

        def finished() -> Iterator[AudioEmbedding]:
            nonlocal next_out
            while next_out in files and files[next_out].ended and files[next_out].pending == 0:
                result = files.pop(next_out).result(sr, clip, segments, normalize)
                if result.error is not None and on_error:
                    on_error(result.path, result.error)
                next_out += 1
                yield result

        for piece in iter_pieces(paths, opts, workers, frontend=self.features.frontend if self.fused else None):
            state = files.setdefault(piece.index, _StreamedFile(piece.path))
            payload = None
            if piece.kind in ("clip", "window"):
                payload = piece.samples
            elif piece.kind == "fusion":
                payload = FusionStack(piece.features, piece.longer)
            elif piece.kind in ("end", "error"):
                state.ended, state.end = True, piece
                if state.error is None:
                    state.error, state.error_kind = piece.error, piece.error_kind
                _log_messages(piece.path, piece.messages)
            if payload is not None:
                jobs.append((piece.index, "file" if piece.kind != "window" else piece.start, payload, None))
                state.pending += 1
            if on_audio and piece.seconds:
                on_audio(piece.path, piece.seconds, piece.expected_seconds)
            if len(jobs) >= batch_size:
                batch, jobs = jobs[:batch_size], jobs[batch_size:]
                run(batch)
            yield from finished()
        if jobs:
            run(jobs)
            jobs = []
        yield from finished()

    def _embed_files_whole(self, paths, batch_size, segments, workers, on_error, normalize, on_audio):
        """`embed_files` for models that embed whole clips (Wav2CLIP): each file decoded whole, then
        `embed_waveforms` on batches of files."""
        from .audio.loader import iter_decoded

        pending: list = []

        def embed(decoded: list) -> list[AudioEmbedding]:
            waves = [d.samples for d in decoded]
            try:
                return self.embed_waveforms(waves, segments=segments, batch_size=batch_size, normalize=normalize)
            except (RuntimeError, ValueError, MemoryError) as exc:
                if len(decoded) == 1:
                    decoded[0].error, decoded[0].error_kind = _embed_failure(exc), failure_kind(exc)
                    return []
                return [e for d in decoded for e in embed([d])]  # find the file at fault, keep the rest

        def flush():
            it = iter(embed([d for d in pending if d.error is None]))
            for d in pending:
                if d.error is not None:
                    if on_error:
                        on_error(d.path, d.error)
                    yield AudioEmbedding(d.path, 0.0, None, error=d.error, error_kind=d.error_kind)
                else:
                    e = next(it)
                    e.path, e.sample_rate, e.channels, e.partial = d.path, d.sample_rate, d.channels, d.partial
                    yield e
            pending.clear()

        sr, quantize = self.config.frontend.sample_rate, self.config.frontend.quantize_int16
        for decoded in iter_decoded(paths, sr, quantize, workers):
            if on_audio and decoded.samples is not None:
                seconds = len(decoded.samples) / sr
                on_audio(decoded.path, seconds, seconds)
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
    engine: str | None = None,
) -> Clap:
    """Load a model: a hub id (default `laion/clap-htsat-fused`), a local directory, or an original .pt.

    precision: auto (fp32 on every device: the faithful rule of `clapcli.runtime`), fp32, bf16 (faster where
    native, not exact, batch-dependent) or int8 (CPU: dynamic int8 Linear layers, within cosine 0.995 of fp32). text_only: read and build only the text tower and projection (the audio weights
    never read) where the checkpoint allows it (a Hugging Face or clapcli directory with a text tower of its
    own); elsewhere the whole model loads. A text search without torch runs the saved query graph instead
    (`clapcli.models.onnx_text`).
    engine: None ($CLAP_ENGINE if set, else auto), auto (onnx for int8 where it can run: CPU, an HTSAT encoder,
    onnxruntime installed; else torch), torch, or onnx (the audio encoder in onnxruntime, fp32 or int8; see
    `clapcli.models.onnx_audio`)."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    ref = name_or_path or default_model()
    return Clap(load_checkpoint(ref, tokenizer=tokenizer, text_only=text_only), dev, prec, engine)


def load_classifier(directory: str | os.PathLike, model: Clap | None = None, device: str = "auto",
                    precision: str = "auto", engine: str | None = None) -> Classifier:
    """Load a classifier written by `clap finetune` (see `clapcli.models.classifier`) with its model: `model` if
    given (refused unless it is the one the head was trained on), else the model the classifier names (its
    base model, or the finetuned `model/` it saved)."""
    classifier = read_classifier(directory)
    if model is None:
        model = load_model(classifier.model_ref, device=device, precision=precision, engine=engine)
    classifier.check_model(model)
    classifier.model = model
    return classifier
