"""Mel front end and model inputs against transformers' ClapFeatureExtractor, plus the padding, fusion
and windowing rules on their own."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_synth import tone_noise
from hf_replay import replay_hf_fusion_crops
from tiny_models import HUB_PREPROCESSOR
from clapcli.audio import (
    FeatureBuilder,
    MelFrontEnd,
    build_fusion_input,
    fusion_crop_starts,
    mel_filter_bank,
    repeat_pad,
    window_starts,
)
from clapcli.audio.config import FrontEndConfig

SR = 48_000
CLIP = 480_000
TOLERANCE_DB = 1e-3
LENGTHS_S = [0.3, 1.0, 9.99, 10.0, 10.005, 12.0, 61.0]

@pytest.fixture(scope="module")
def hf_fused():
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(truncation="fusion", **HUB_PREPROCESSOR)


@pytest.fixture(scope="module")
def hf_unfused():
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(truncation="rand_trunc", **HUB_PREPROCESSOR)


@pytest.fixture(scope="module")
def fused_builder():
    return FeatureBuilder(FrontEndConfig(mel_scale="htk"), fused=True)


@pytest.fixture(scope="module")
def unfused_builder():
    return FeatureBuilder(FrontEndConfig(mel_scale="slaney"), fused=False)


@functools.lru_cache(maxsize=None)
def clip(seconds: float, seed: int | None = None) -> np.ndarray:
    """Realistic int16-quantised mono audio at 48 kHz (cached: treat as read-only)."""
    return tone_noise(seconds, SR, seed=int(seconds * 1000) if seed is None else seed)


# -- mel filters and STFT ------------------------------------------------------------------------------


@pytest.mark.parametrize("scale,norm", [("htk", None), ("slaney", "slaney")])
def test_mel_filter_bank_matches_transformers(scale, norm):
    from transformers.audio_utils import mel_filter_bank as hf_mel_filter_bank

    ours = mel_filter_bank(FrontEndConfig(mel_scale=scale))
    assert ours.shape == (513, 64) and ours.dtype == torch.float64
    ref = hf_mel_filter_bank(513, 64, 50, 14_000, SR, norm=norm, mel_scale=scale)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_htk_filters_are_torchaudio_defaults():
    import torchaudio.functional as AF

    ref = AF.melscale_fbanks(513, 50.0, 14_000.0, 64, SR)  # float32, mel_scale="htk", norm=None
    np.testing.assert_allclose(mel_filter_bank(FrontEndConfig()).numpy(), ref.numpy(), atol=2e-5)


def test_unknown_mel_scale_is_refused():
    with pytest.raises(ValueError, match="mel_scale"):
        mel_filter_bank(FrontEndConfig(mel_scale="kaldi"))


def test_mel_front_end_shapes_floor_and_batching():
    front = MelFrontEnd(FrontEndConfig())
    waves = torch.from_numpy(np.stack([clip(10.0), clip(61.0)[:CLIP], clip(12.0)[-CLIP:]]))  # (3, 480000)
    mel = front(waves)
    assert mel.shape == (3, 1001, 64) and mel.dtype == torch.float32
    for i in range(3):
        assert torch.equal(front(waves[i : i + 1])[0], mel[i])
    silence = front(torch.zeros(1, 4_800))
    assert silence.shape == (1, 11, 64) and torch.all(silence == -100.0)  # power floor 1e-10, no top_db
    assert front(torch.zeros(2, 12 * SR + 479)).shape == (2, 1201, 64)
    assert {name for name, _ in front.named_buffers()} == {"window", "mel_fb"}
    with pytest.raises(ValueError):
        front(waves[0])


def test_mel_front_end_on_accelerator_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    waves = torch.from_numpy(np.stack([clip(10.0), clip(61.0)[-CLIP:]]))
    cpu = MelFrontEnd(FrontEndConfig())(waves)
    gpu = MelFrontEnd(FrontEndConfig()).to("cuda")(waves.cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() <= TOLERANCE_DB


# -- parity with transformers ClapFeatureExtractor ----------------------------------------------------


@pytest.mark.parametrize("seconds", LENGTHS_S)
def test_fused_features_match_transformers(seconds, hf_fused, fused_builder):
    wave = clip(seconds)
    np.random.seed(1234)
    ref = hf_fused([wave], sampling_rate=SR, return_tensors="pt")
    starts = replay_hf_fusion_crops([len(wave)], seed=1234)
    ours, longer = fused_builder.clip_features([wave], crop_starts=starts)
    assert ours.shape == ref["input_features"].shape == (1, 4, 1001, 64)
    diff = (ours - ref["input_features"]).abs().max().item()
    assert diff <= TOLERANCE_DB, f"{seconds} s: max |dB diff| {diff}"
    genuinely_long = len(wave) // 480 + 1 > 1001
    assert bool(longer[0]) == genuinely_long
    if genuinely_long:  # HF marks a lone short clip as longer at random; compare only real fusion clips
        assert ref["is_longer"].tolist() == [[True]]


def test_fused_batch_matches_transformers(hf_fused, fused_builder):
    waves = [clip(s) for s in LENGTHS_S]
    np.random.seed(99)
    ref = hf_fused(waves, sampling_rate=SR, return_tensors="pt")
    starts = replay_hf_fusion_crops([len(w) for w in waves], seed=99)  # HF draws clip by clip, in batch order
    ours, longer = fused_builder.clip_features(waves, crop_starts=starts)
    assert (ours - ref["input_features"]).abs().max().item() <= TOLERANCE_DB
    assert longer.tolist() == ref["is_longer"][:, 0].tolist() == [False] * 5 + [True] * 2


@pytest.mark.parametrize("seconds", [s for s in LENGTHS_S if s <= 10.0])
def test_unfused_features_match_transformers(seconds, hf_unfused, unfused_builder):
    wave = clip(seconds)
    ref = hf_unfused([wave], sampling_rate=SR, return_tensors="pt")
    ours, longer = unfused_builder.clip_features([wave])
    assert ours.shape == ref["input_features"].shape == (1, 1, 1001, 64)
    diff = (ours - ref["input_features"]).abs().max().item()
    assert diff <= TOLERANCE_DB, f"{seconds} s: max |dB diff| {diff}"
    assert longer.tolist() == [False]


def test_quiet_bands_stay_within_tolerance(hf_fused, fused_builder):
    """Loud lows and faint top bands: a float32 STFT is ~9e-3 dB off there, float64 stays at float32 ulps."""
    t = np.arange(CLIP) / SR
    rng = np.random.default_rng(0)
    loud = 0.9 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.5 * t))
    faint = 3e-4 * rng.standard_normal(CLIP)
    wave = ((np.clip(loud + faint, -1, 1) * np.float32(32767)).astype(np.int16) / 32767.0).astype(np.float32)
    ref = hf_fused([wave], sampling_rate=SR, return_tensors="pt")["input_features"]
    ours, _ = fused_builder.clip_features([wave])
    assert ref[0, 0].max() - ref[0, 0, :, -8:].max() > 40  # the top bands really are quiet
    assert (ours - ref).abs().max().item() <= TOLERANCE_DB


# -- padding, fusion and window rules -----------------------------------------------------------------


def test_repeat_pad_rule():
    w = torch.arange(1, 4, dtype=torch.float32)  # 3 samples into 10: 3 copies, then one zero
    assert repeat_pad(w, 10).tolist() == [1, 2, 3, 1, 2, 3, 1, 2, 3, 0]
    w4 = torch.arange(1, 5, dtype=torch.float32)  # 4 into 10: floor(10/4) = 2 copies, then two zeros
    assert repeat_pad(w4, 10).tolist() == [1, 2, 3, 4, 1, 2, 3, 4, 0, 0]
    assert repeat_pad(torch.ones(5), 10).tolist() == [1.0] * 10
    exact, longer = torch.ones(10), torch.ones(12)
    assert repeat_pad(exact, 10) is exact and repeat_pad(longer, 10) is longer
    wave = torch.from_numpy(clip(0.3))
    n_rep = CLIP // len(wave)
    expected = np.pad(np.tile(wave.numpy(), n_rep), (0, CLIP - n_rep * len(wave)))  # HF "repeatpad"
    assert np.array_equal(repeat_pad(wave).numpy(), expected)
    with pytest.raises(ValueError):
        repeat_pad(torch.zeros(0), 10)


def test_fusion_crop_starts_formula():
    assert fusion_crop_starts(1001) == (0, 0, 0)  # one valid start; empty parts become [0]
    assert fusion_crop_starts(1002) == (0, 1, 0)  # starts [0, 1] split as [0], [1], [] -> [0]
    assert fusion_crop_starts(1003) == (0, 1, 2)
    assert fusion_crop_starts(1201) == (33, 100, 167)  # 201 starts: parts of 67, middle elements
    # 61 s: 6101 frames, 5101 starts split 1701 / 1700 / 1700
    assert fusion_crop_starts(6101) == (850, 1701 + 850, 3401 + 850)
    for total in [1001, 1002, 1003, 1004, 1005, 1500, 2001, 6101, 36001]:
        parts = np.array_split(np.arange(total - 1001 + 1), 3)
        parts = [p if len(p) else np.array([0]) for p in parts]
        assert fusion_crop_starts(total) == tuple(int(p[len(p) // 2]) for p in parts)
        assert all(0 <= s <= total - 1001 for s in fusion_crop_starts(total))
    with pytest.raises(ValueError):
        fusion_crop_starts(1000)


def test_build_fusion_input():
    mel = torch.randn(1001, 64)
    stacked, longer = build_fusion_input(mel)
    assert stacked.shape == (4, 1001, 64) and not longer
    assert all(torch.equal(stacked[c], mel) for c in range(4))

    mel = torch.randn(1500, 64)
    stacked, longer = build_fusion_input(mel)
    assert stacked.shape == (4, 1001, 64) and longer
    shrunk = F.interpolate(mel[None, None], size=(1001, 64), mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(stacked[0], shrunk)
    for c, s in enumerate(fusion_crop_starts(1500), start=1):
        assert torch.equal(stacked[c], mel[s : s + 1001])
    explicit, _ = build_fusion_input(mel, crop_starts=(0, 250, 499))
    assert torch.equal(explicit[1], mel[:1001]) and torch.equal(explicit[3], mel[499:])
    for bad in [(0, 0, 500), (-1, 0, 0), (0, 0)]:
        with pytest.raises(ValueError):
            build_fusion_input(mel, crop_starts=bad)
    with pytest.raises(ValueError):
        build_fusion_input(torch.randn(1000, 64))


@pytest.mark.parametrize(
    "n", [1, 1_000, 479_999, 480_000, 480_001, 959_999, 960_000, 960_001, 1_440_000, 2_929_417, 61 * SR]
)
def test_window_starts_cover_every_sample(n):
    window = 480_000
    starts = window_starts(n, window)
    assert starts[0] == 0
    assert starts == sorted(set(starts))  # ascending, no duplicates
    if n <= window:
        assert starts == [0]
        return
    assert starts[-1] + window == n  # the last window ends at the end of the file
    assert all(b - a <= window for a, b in zip(starts, starts[1:]))  # no gap between windows
    assert all(b - a == window for a, b in zip(starts[:-2], starts[1:-1]))  # full strides until the last
    covered = np.zeros(n, bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered.all()


# -- the feature builder ------------------------------------------------------------------------------


def test_features_do_not_depend_on_batch(fused_builder, unfused_builder):
    waves = [clip(s) for s in [0.3, 10.0, 12.0, 1.0, 10.005, 61.0]]
    together, longer = fused_builder.clip_features(waves)
    assert together.shape == (6, 4, 1001, 64) and together.dtype == torch.float32
    assert longer.tolist() == [False, False, True, False, False, True]
    for i, w in enumerate(waves):
        alone, alone_longer = fused_builder.clip_features([w])
        assert torch.equal(alone[0], together[i]) and alone_longer[0] == longer[i]
    shuffled, _ = fused_builder.clip_features([waves[3], waves[0], torch.from_numpy(waves[1])])
    assert torch.equal(shuffled, together[[3, 0, 1]])

    short = [w for w in waves if len(w) <= CLIP]
    together, longer = unfused_builder.clip_features(short)
    assert together.shape == (len(short), 1, 1001, 64) and not longer.any()
    for i, w in enumerate(short):
        assert torch.equal(unfused_builder.clip_features([w])[0][0], together[i])


def test_short_fused_clips_are_four_copies(fused_builder):
    features, longer = fused_builder.clip_features([clip(3.0)])
    assert not longer[0]
    assert all(torch.equal(features[0, c], features[0, 0]) for c in range(1, 4))


def test_explicit_crop_starts_override(fused_builder):
    wave = clip(12.0)
    default, _ = fused_builder.clip_features([wave])
    shifted, _ = fused_builder.clip_features([wave], crop_starts=[(0, 100, 200)])
    assert torch.equal(default[0, 0], shifted[0, 0])  # the global channel does not depend on crops
    mel = MelFrontEnd(FrontEndConfig())(torch.from_numpy(wave)[None])[0]
    assert torch.equal(shifted[0, 2], mel[100:1101]) and torch.equal(shifted[0, 3], mel[200:1201])
    with pytest.raises(ValueError):
        fused_builder.clip_features([wave], crop_starts=[(0, 0, 0), None])


def test_unfused_refuses_audio_longer_than_one_clip(unfused_builder):
    with pytest.raises(ValueError, match="window_starts"):
        unfused_builder.clip_features([clip(10.005)])
    with pytest.raises(ValueError):
        unfused_builder.clip_features([])
