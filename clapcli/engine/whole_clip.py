"""Wav2CLIP's whole-clip path: models with a "linear" front end embed each clip whole, not in 10 s windows.

`embed_whole_clips` is `Clap.embed_waveforms` for such a model, `embed_files` its `Clap.embed_files` (each file
decoded whole, then embedded in batches of files). See the docs, "Wav2CLIP"."""

from __future__ import annotations

import numpy as np
import torch

from ..audio.features import window_starts
from ..errors import ClapError, failure_kind
from ..records import AudioEmbedding, Segment
from .streaming import embed_failure

WHOLE_CLIP_SECONDS = 300.0  # longest piece of a clip embedded in one pass
SEGMENT_SECONDS = 1.0  # segment (timeline, index window) length
SEGMENT_BATCH = 64  # 1 s segments per forward pass at least (~15 MB of activations at width 64)


def embed_whole_clips(model, waves, segments: bool, batch_size: int, normalize: bool) -> list[AudioEmbedding]:
    """Wav2CLIP's utterance mode: each 16 kHz clip whole through the encoder of `model` (a `Clap`; no padding
    to a clip length, no window mean), then the head. Clips go one at a time, so no clip sees another. A clip
    longer than WHOLE_CLIP_SECONDS is cut into that many equal pieces of at most that length, and its
    pooled encoder output is the duration-weighted mean of theirs (bounded memory). With `segments`, a
    clip longer than SEGMENT_SECONDS also gets full-coverage 1 s windows (the last aligned to the end),
    embedded as 1 s clips: the original's frame-level use."""
    sr = model.config.frontend.sample_rate
    limit, seg = int(WHOLE_CLIP_SECONDS * sr), int(SEGMENT_SECONDS * sr)
    results = []
    for wave in waves:
        n = len(wave)
        if n == 0:
            raise ClapError("cannot embed an empty waveform")
        pieces = -(-n // limit)  # ceil
        bounds = [round(i * n / pieces) for i in range(pieces + 1)]
        pooled = sum((_encode_pooled(model, wave[a:b]) * ((b - a) / n) for a, b in zip(bounds, bounds[1:])))
        norms: list[float] = []
        result = AudioEmbedding(None, n / sr, _project(model, pooled, normalize, norms)[0])
        result.norm = norms[0] if norms else None
        if segments and n > seg:
            starts = window_starts(n, seg)
            per_pass = max(batch_size, SEGMENT_BATCH)
            for b in range(0, len(starts), per_pass):
                chunk = starts[b : b + per_pass]
                batch = torch.as_tensor(np.stack([wave[s : s + seg] for s in chunk]), dtype=torch.float32)
                feats = model.features.frontend(batch.to(model.device))[:, None]  # (S, 1, frames, bins)
                with torch.inference_mode(), model._autocast():
                    norms = []
                    vecs = _project(model, model.model.audio_model.audio_encoder(feats), normalize, norms)
                result.segments += [Segment(s / sr, (s + seg) / sr, v, norms[k] if norms else None)
                                    for k, (s, v) in enumerate(zip(chunk, vecs))]
        results.append(result)
    return results


@torch.inference_mode()
def _encode_pooled(model, wave: np.ndarray) -> torch.Tensor:
    """One clip of any length → its pooled encoder output (1, out_width) float32."""
    feats = model.features.whole_clip_features(wave)  # (1, 1, frames, bins)
    with model._autocast():
        return model.model.audio_model.audio_encoder(feats).float()


@torch.inference_mode()
def _project(model, pooled: torch.Tensor, normalize: bool, norms: list[float] | None = None) -> list[np.ndarray]:
    """Pooled encoder outputs (B, out_width) → the audio head's (B, D) embeddings, as numpy rows; with `norms`
    (and `normalize`), the raw outputs' L2 norms are appended to it."""
    with model._autocast():
        emb = model.model.audio_projection(pooled).float()
    if normalize and norms is not None:
        norms.extend(emb.norm(dim=-1).tolist())
    emb = torch.nn.functional.normalize(emb, dim=-1) if normalize else emb
    return list(emb.cpu().numpy())


def embed_files(model, paths, batch_size, segments, workers, on_error, normalize, on_audio):
    """`Clap.embed_files` (see there) for a model that embeds whole clips: each file decoded whole, then
    `model.embed_waveforms` on batches of files."""
    from ..audio.loader import iter_decoded

    pending: list = []

    def embed(decoded: list) -> list[AudioEmbedding]:
        waves = [d.samples for d in decoded]
        try:
            return model.embed_waveforms(waves, segments=segments, batch_size=batch_size, normalize=normalize)
        except (RuntimeError, ValueError, MemoryError) as exc:
            if len(decoded) == 1:
                decoded[0].error, decoded[0].error_kind = embed_failure(exc), failure_kind(exc)
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

    sr, quantize = model.config.frontend.sample_rate, model.config.frontend.quantize_int16
    for decoded in iter_decoded(paths, sr, quantize, workers):
        if on_audio and decoded.samples is not None:
            seconds = len(decoded.samples) / sr
            on_audio(decoded.path, seconds, seconds)
        pending.append(decoded)
        if len(pending) >= batch_size:
            yield from flush()
    if pending:
        yield from flush()
