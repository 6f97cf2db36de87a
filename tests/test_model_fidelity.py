"""Our pipeline against transformers' ClapFeatureExtractor + ClapModel on the same tiny random weights.

Waveform in, embedding out: decode-free (synthesised, int16-quantised) audio goes through our front end
and model, and through the reference's; the embeddings must agree to cosine ≥ 0.9999.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from audio_synth import tone_noise
from hf_replay import replay_hf_fusion_crops
from clapcli import load_model

SR = 48_000


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def hf_audio(hf_model, extractor, waves, is_longer=None, seed=0):
    """Reference embeddings; returns (embeddings, crop positions HF drew for the long fused clips)."""
    np.random.seed(seed)
    feats = extractor([w.astype(np.float64) for w in waves], sampling_rate=SR, return_tensors="pt")
    fusion = extractor.truncation == "fusion"
    crops = replay_hf_fusion_crops([len(w) for w in waves], seed) if fusion else [None] * len(waves)
    longer = feats["is_longer"].reshape(-1) if is_longer is None else torch.tensor(is_longer)
    with torch.no_grad():
        out = hf_model.get_audio_features(input_features=feats["input_features"], is_longer=longer[:, None])
    return out.pooler_output.numpy(), crops


@pytest.fixture(scope="module")
def fused(tiny_fused):
    directory, hf_model, tokenizer, extractor = tiny_fused
    return load_model(directory, device="cpu", precision="fp32"), hf_model, tokenizer, extractor


@pytest.fixture(scope="module")
def unfused(tiny_unfused):
    directory, hf_model, tokenizer, extractor = tiny_unfused
    return load_model(directory, device="cpu", precision="fp32"), hf_model, tokenizer, extractor


SHORT = [0.3, 1.0, 9.99, 10.0]
LONG = [10.005, 12.0, 31.0]


def test_fused_short_clips_match_reference_global_path(fused):
    ours, hf_model, _, extractor = fused
    waves = [tone_noise(s, SR, seed=i) for i, s in enumerate(SHORT)]
    ref, _ = hf_audio(hf_model, extractor, waves, is_longer=[False] * len(waves))
    got = np.stack([e.embedding for e in ours.embed_waveforms(waves, segments=False, batch_size=3)])
    assert cosine(got, ref).min() >= 0.9999


def test_fused_long_clips_match_reference_given_same_crops(fused):
    ours, hf_model, _, extractor = fused
    waves = [tone_noise(s, SR, seed=10 + i) for i, s in enumerate(LONG)]
    ref, crops = hf_audio(hf_model, extractor, waves, seed=1234)
    got = ours.embed_waveforms(waves, segments=False, batch_size=2, crop_starts=crops)
    assert cosine(np.stack([e.embedding for e in got]), ref).min() >= 0.9999
    # 10.005 s is 1001 frames: the whole mel four times, not longer — as the references do
    assert crops[0] is None


def test_fused_long_clip_actually_uses_fusion(fused):
    """Guard against a silently dropped local path: the fused embedding differs from the global-only one."""
    ours, hf_model, _, extractor = fused
    wave = tone_noise(25.0, SR, seed=3)
    fused_ref, crops = hf_audio(hf_model, extractor, [wave], is_longer=[True])
    global_ref, _ = hf_audio(hf_model, extractor, [wave], is_longer=[False])
    got = ours.embed_waveforms([wave], segments=False, crop_starts=crops)[0].embedding
    assert cosine(got, fused_ref[0]) >= 0.9999
    assert cosine(got, global_ref[0]) < 0.99999


def test_unfused_short_clips_match_reference(unfused):
    ours, hf_model, _, extractor = unfused
    waves = [tone_noise(s, SR, seed=20 + i) for i, s in enumerate(SHORT)]
    ref, _ = hf_audio(hf_model, extractor, waves)
    got = np.stack([e.embedding for e in ours.embed_waveforms(waves, segments=False)])
    assert cosine(got, ref).min() >= 0.9999


def test_unfused_long_file_is_mean_of_full_coverage_windows(unfused):
    ours, hf_model, _, extractor = unfused
    wave = tone_noise(23.5, SR, seed=5)
    starts = [0, 480_000, len(wave) - 480_000]
    ref, _ = hf_audio(hf_model, extractor, [wave[s : s + 480_000] for s in starts])
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    mean = ref.mean(0)
    result = ours.embed_waveforms([wave], segments=True)[0]
    assert cosine(result.embedding, mean) >= 0.9999
    assert [round(s.start * SR) for s in result.segments] == starts
    assert result.segments[-1].end == pytest.approx(23.5)
    assert cosine(np.stack([s.embedding for s in result.segments]), ref).min() >= 0.9999


@pytest.mark.parametrize("which", ["fused", "unfused"])
def test_text_matches_reference(which, request):
    ours, hf_model, tokenizer, _ = request.getfixturevalue(which)
    texts = ["a dog barking", "rain falling on a tin roof in the morning", "glass " * 120]
    tok = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.get_text_features(**tok).pooler_output.numpy()
    got = ours.embed_text(texts)
    assert cosine(got, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_same_input_same_embedding_whatever_the_batch(fused):
    ours = fused[0]
    target = tone_noise(4.0, SR, seed=42)
    alone = ours.embed_waveforms([target], segments=False)[0].embedding
    others = [tone_noise(s, SR, seed=50 + i) for i, s in enumerate([0.5, 12.0, 7.0])]
    mixed = ours.embed_waveforms(others[:2] + [target] + others[2:], segments=False, batch_size=4)[2].embedding
    assert np.abs(alone - mixed).max() < 1e-5


def test_logit_scale_and_dim(fused):
    ours, hf_model, _, _ = fused
    assert ours.dim == 24
    assert ours.logit_scale == pytest.approx(float(hf_model.logit_scale_a.detach().exp()), rel=1e-6)


def test_bf16_autocast_stays_within_cosine_0999_of_fp32(tiny_fused):
    exact = load_model(tiny_fused[0], device="cpu", precision="fp32")
    fast = load_model(tiny_fused[0], device="cpu", precision="bf16")
    assert (exact.precision, fast.precision) == ("fp32", "bf16")
    waves = [tone_noise(s, SR, seed=60 + i) for i, s in enumerate([1.0, 7.0, 14.0, 30.0])]
    a = np.stack([e.embedding for e in exact.embed_waveforms(waves)])
    b = np.stack([e.embedding for e in fast.embed_waveforms(waves)])
    assert cosine(a, b).min() >= 0.999 and not np.array_equal(a, b)
    texts = ["a dog", "rain on a roof"]
    assert cosine(exact.embed_text(texts), fast.embed_text(texts)).min() >= 0.999
