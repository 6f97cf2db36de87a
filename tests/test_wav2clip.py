"""Wav2CLIP: linear front end, ResNet-18 with per-item standardisation, the released `Wav2CLIP.pt` layout,
the lazily loaded CLIP text tower, whole-clip embedding with 1 s segments, and the CLI end to end.

Everything is tiny and offline: a random tiny-wav2clip model (ResNet width 8 → 64, head → 32) and a random
CLIP text tower of width 32 with a character-level CLIP tokenizer built here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_synth import tone_noise, write_audio
from cli_runner import clap

SR = 16_000


# ------------------------------------------------------------------------------------------- fixtures


def clip_tokenizer():
    """A CLIP tokenizer over single bytes (+ "</w>" word ends) and two merges: real CLIP rules, tiny vocab."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = [("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A local CLIP text tower directory: CLIPTextModelWithProjection (text_embeds 32-d) + tokenizer."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    d = tmp_path_factory.mktemp("clip-text")
    tok = clip_tokenizer()
    torch.manual_seed(3)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                         bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eot,
                         pad_token_id=eot, initializer_range=0.5)
    CLIPTextModelWithProjection(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics of about the scale the activations have, so the output still
    depends on the input (statistics far from it would swamp it) and a wrong axis or order shows."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.weight.data.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def tiny_model(text_tower: str, seed: int = 0):
    from clapcli.models.clap import ClapModel
    from clapcli.models.presets import preset

    cfg = preset("tiny-wav2clip")
    cfg.text_tower = text_tower
    torch.manual_seed(seed)
    model = ClapModel(cfg).eval()
    randomise_batchnorm(model, seed)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, clip_dir) -> Path:
    """A tiny Wav2CLIP model in the own format whose text tower is the local tiny CLIP directory."""
    from clapcli.models.checkpoints import save_own

    d = tmp_path_factory.mktemp("tiny-wav2clip")
    save_own(tiny_model(str(clip_dir)), None, d)
    return d


@pytest.fixture(scope="module")
def clap_model(model_dir):
    from clapcli.engine.load import load_model

    return load_model(str(model_dir), device="cpu", precision="fp32")


def wave(seconds: float, seed: int) -> np.ndarray:
    return tone_noise(seconds, sr=SR, seed=seed, quantize=False)


# ------------------------------------------------------------------------------------------- front end


def test_linear_front_end_equals_torchaudio_spectrogram_then_log():
    import torchaudio

    from clapcli.audio.frontend import build_frontend
    from clapcli.models.presets import preset

    x = torch.randn(3, 20_001, generator=torch.Generator().manual_seed(0))
    ours = build_frontend(preset("wav2clip").frontend)(x)  # (B, frames, 257)
    reference = torch.log(torchaudio.transforms.Spectrogram(n_fft=512, hop_length=353)(x) + 1e-7)  # (B, 257, T)
    assert ours.shape == (3, 20_001 // 353 + 1, 257)
    torch.testing.assert_close(ours, reference.transpose(1, 2), rtol=1e-6, atol=1e-5)


def test_feature_builder_repeat_pads_fixed_clips_and_refuses_longer_ones():
    from clapcli.audio.features import FeatureBuilder, repeat_pad
    from clapcli.models.presets import preset

    cfg = preset("tiny-wav2clip").frontend
    fb = FeatureBuilder(cfg, fused=False)
    short, exact = wave(0.7, 1), wave(cfg.clip_samples / SR, 2)
    feats, longer = fb.clip_features([short, exact])
    assert feats.shape == (2, 1, cfg.clip_samples // 353 + 1, 257)
    assert not longer.any()
    padded = repeat_pad(torch.from_numpy(short), cfg.clip_samples)
    torch.testing.assert_close(feats[0, 0], fb.frontend(padded[None])[0])
    with pytest.raises(ValueError, match="more than one"):
        fb.clip_features([wave(cfg.clip_samples / SR + 0.1, 3)])


def test_mel_identities_stored_without_kind_still_match():
    from clapcli.identity import model_identity, same_model
    from clapcli.audio.config import FrontEndConfig
    from clapcli.models.presets import preset

    mel = FrontEndConfig()
    old = model_identity("m", "w", {k: v for k, v in mel.settings().items() if k != "kind"}, True, 512)
    assert "kind" not in mel.settings()
    assert same_model(old, model_identity("m", "w", mel.settings(), True, 512))
    linear = preset("wav2clip").frontend.settings()
    assert linear["kind"] == "linear" and linear["sample_rate"] == 16_000 and linear["quantize_int16"] is False


# ------------------------------------------------------------------------------------------- encoder


def test_encoder_standardises_each_item_on_its_own():
    model = tiny_model("unused")
    enc = model.audio_model.audio_encoder
    feats = torch.randn(3, 1, 60, 257, generator=torch.Generator().manual_seed(1))
    feats[1] = feats[1] * 5 + 3  # items on very different scales: whole-batch statistics would mix them
    with torch.no_grad():
        together = enc(feats)
        alone = torch.cat([enc(feats[i : i + 1]) for i in range(3)])
        x = feats.transpose(2, 3)  # what the original does: one mean/std over the whole batch tensor
        batch_std = (x - x.mean()) / (x.std() + 1e-9)
        whole_batch = enc.avgpool(enc.layer4(enc.layer3(enc.layer2(enc.layer1(
            enc.maxpool(enc.relu(enc.bn1(enc.conv1(batch_std))))))))).flatten(1)
    assert together.shape == (3, 64)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert (whole_batch - together).abs().max() > 1e-2  # the test can tell the two rules apart


def test_embeddings_are_batch_independent_deterministic_and_normalised(clap_model):
    waves = [wave(0.4, 1), wave(2.3, 2), wave(1.0, 3)]
    together = clap_model.embed_audio(waves, sample_rate=SR, batch_size=3)
    alone = np.stack([clap_model.embed_audio(w, sample_rate=SR)[0] for w in waves])
    again = clap_model.embed_audio(waves, sample_rate=SR, batch_size=2)
    assert together.shape == (3, 32)
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_array_equal(together, again)
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 1e-3


def test_whole_clip_then_head_with_one_second_segments(clap_model):
    w = wave(2.5, 4)
    (result,) = clap_model.embed_waveforms([w], segments=True)
    enc, head = clap_model.model.audio_model.audio_encoder, clap_model.model.audio_projection
    with torch.no_grad():
        feats = clap_model.features.frontend(torch.from_numpy(w)[None])[:, None]  # the whole clip, no padding
        expected = F.normalize(head(enc(feats)), dim=-1)[0].numpy()
    np.testing.assert_allclose(result.embedding, expected, atol=1e-5)
    assert [(s.start, s.end) for s in result.segments] == [(0.0, 1.0), (1.0, 2.0), (1.5, 2.5)]
    for s in result.segments:
        a = int(s.start * SR)
        np.testing.assert_allclose(s.embedding, clap_model.embed_audio(w[a : a + SR], sample_rate=SR)[0], atol=1e-5)


def test_long_clips_are_the_duration_weighted_mean_of_pieces(clap_model, monkeypatch):
    from clapcli.engine import whole_clip

    monkeypatch.setattr(whole_clip, "WHOLE_CLIP_SECONDS", 1.0)
    w = wave(2.5, 5)  # 3 pieces of 2.5 s / 3
    (result,) = clap_model.embed_waveforms([w], segments=False)
    enc, head = clap_model.model.audio_model.audio_encoder, clap_model.model.audio_projection
    bounds = [round(i * len(w) / 3) for i in range(4)]
    with torch.no_grad():
        pooled = sum(enc(clap_model.features.frontend(torch.from_numpy(w[a:b])[None])[:, None]) * (b - a) / len(w)
                     for a, b in zip(bounds, bounds[1:]))
        expected = F.normalize(head(pooled), dim=-1)[0].numpy()
    np.testing.assert_allclose(result.embedding, expected, atol=1e-5)
    whole = F.normalize(head(enc(clap_model.features.frontend(torch.from_numpy(w)[None])[:, None])), dim=-1)
    assert np.abs(whole[0].detach().numpy() - result.embedding).max() > 1e-4  # pieces did happen


# ------------------------------------------------------------------------------------------- released layout


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """Our tiny model's weights under the released Wav2CLIP.pt key names, with its extra tensors."""
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("audio_model.audio_encoder."):
            state["audio_encoder." + key[len("audio_model.audio_encoder."):]] = value.clone()
        elif key.startswith("audio_projection.linear"):
            index = {"1": "0", "2": "3"}[key[len("audio_projection.linear")]]
            state[f"audio_transform.sequential.{index}.{key.rsplit('.', 1)[1]}"] = value.clone()
    width = model.config.audio.resnet_width * 8
    state["audio_encoder.spectrogram.window"] = torch.hann_window(512)
    state["audio_encoder.fc.weight"] = torch.randn(1000, width)
    state["audio_encoder.fc.bias"] = torch.randn(1000)
    return state


def reference_embedding(state: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    """The original forward, written out: Spectrogram inside, whole-batch standardisation (of one item),
    torchvision ResNet order, then MLPLayers (Linear, ReLU, [Dropout], Linear)."""
    import torchaudio

    def bn(h, p):
        return F.batch_norm(h, state[p + ".running_mean"], state[p + ".running_var"], state[p + ".weight"],
                            state[p + ".bias"], training=False, eps=1e-5)

    def block(h, p, stride):
        out = F.relu(bn(F.conv2d(h, state[p + ".conv1.weight"], stride=stride, padding=1), p + ".bn1"))
        out = bn(F.conv2d(out, state[p + ".conv2.weight"], padding=1), p + ".bn2")
        if p + ".downsample.0.weight" in state:
            h = bn(F.conv2d(h, state[p + ".downsample.0.weight"], stride=stride), p + ".downsample.1")
        return F.relu(out + h)

    with torch.no_grad():
        audio = torch.from_numpy(x)[None]  # a batch of one
        h = torchaudio.transforms.Spectrogram(n_fft=512, hop_length=353)(audio.unsqueeze(1))  # (1, 1, 257, T)
        h = torch.log(h + 1e-7)
        h = (h - torch.mean(h)) / (torch.std(h) + 1e-9)
        e = "audio_encoder."
        h = F.relu(bn(F.conv2d(h, state[e + "conv1.weight"], stride=2, padding=3), e + "bn1"))
        h = F.max_pool2d(h, kernel_size=3, stride=2, padding=1)
        for layer in range(1, 5):
            for b in range(2):
                h = block(h, f"{e}layer{layer}.{b}", 2 if layer > 1 and b == 0 else 1)
        h = F.adaptive_avg_pool2d(h, 1).reshape(1, -1)
        t = "audio_transform.sequential."
        h = F.linear(F.relu(F.linear(h, state[t + "0.weight"], state[t + "0.bias"])), state[t + "3.weight"],
                     state[t + "3.bias"])
        return F.normalize(h, dim=-1)[0].numpy()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    d = tmp_path_factory.mktemp("released")
    state = original_state_dict(tiny_model("unused", seed=7))
    state["image_transform.sequential.0.weight"] = torch.randn(4, 4)  # training leftovers the original skips
    state["loss_fn_a.logit_scale"] = torch.tensor(2.0)
    torch.save(state, d / "Wav2CLIP.pt")
    return d / "Wav2CLIP.pt", state


def test_released_layout_loads_strictly_and_embeds_like_the_original(released, clip_dir):
    from clapcli.engine.clap import Clap
    from clapcli.models.checkpoints import load_checkpoint
    from clapcli.runtime import resolve_device

    path, state = released
    loaded = load_checkpoint(str(path), tokenizer=str(clip_dir))
    assert loaded.kind == "wav2clip" and loaded.tokenizer is None
    assert loaded.model.config.audio.resnet_width == 8 and loaded.model.config.projection_dim == 32
    m = Clap(loaded, resolve_device("cpu"), "fp32")
    assert m.logit_scale == pytest.approx(100.0)
    x = wave(3.3, 8)
    got = m.embed_audio(x, sample_rate=SR)[0]
    expected = reference_embedding(state, x)
    assert float(got @ expected) > 0.9999
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("audio_encoder.layer2.0.bn1.running_var"), "missing from the checkpoint"),
    (lambda s: s.__setitem__("audio_encoder.layer5.weight", torch.zeros(1)), "not used by the model"),
    (lambda s: s.__setitem__("audio_transform.sequential.0.bias", torch.zeros(7)), "shape mismatches"),
    (lambda s: s.__setitem__("audio_encoder.spectrogram.window", torch.ones(512)), "periodic Hann"),
])
def test_released_layout_is_strict_with_a_readable_diff(released, tmp_path, change, message):
    from clapcli.errors import CheckpointError
    from clapcli.models.checkpoints import load_checkpoint

    state = dict(released[1])
    change(state)
    torch.save(state, tmp_path / "Wav2CLIP.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(tmp_path / "Wav2CLIP.pt"))


# ------------------------------------------------------------------------------------------- text tower


def test_text_embeddings_are_clips_text_embeds(clap_model, clip_dir):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    texts = ["a dog", "glass shattering on a hard floor"]
    got = clap_model.embed_text(texts)
    tok = AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        ref = CLIPTextModelWithProjection.from_pretrained(clip_dir)(**tok(texts, padding=True, return_tensors="pt"))
    np.testing.assert_allclose(got, F.normalize(ref.text_embeds, dim=-1).numpy(), atol=1e-5)
    np.testing.assert_allclose(clap_model.embed_text(texts[:1]), got[:1], atol=1e-5)  # padding changes nothing
    assert clap_model.logit_scale == pytest.approx(100.0)


def test_audio_only_use_works_without_a_text_tower(tmp_path):
    from clapcli.engine.load import load_model
    from clapcli.errors import CheckpointError, WeightsNotAvailable
    from clapcli.models.checkpoints import save_own

    save_own(tiny_model("no-such-org/no-such-clip"), None, tmp_path / "m")
    m = load_model(str(tmp_path / "m"), device="cpu")
    assert m.embed_audio(wave(1.2, 1), sample_rate=SR).shape == (1, 32)
    with pytest.raises(WeightsNotAvailable, match="'no-such-org/no-such-clip'.*audio-only use works without it"):
        m.embed_text(["a dog"])
    (tmp_path / "not-clip").mkdir()
    save_own(tiny_model(str(tmp_path / "not-clip")), None, tmp_path / "m2")
    with pytest.raises(CheckpointError, match="cannot load the CLIP text tower in"):
        load_model(str(tmp_path / "m2"), device="cpu").embed_text(["a dog"])


def test_own_format_round_trip_keeps_the_weights_and_a_reference_to_the_tower(clap_model, model_dir, clip_dir,
                                                                            tmp_path):
    import shutil

    from clapcli.engine.load import load_model

    config = json.loads((model_dir / "config.json").read_text())
    assert config["config"]["text_tower"] == str(clip_dir.resolve())
    assert not list(model_dir.glob("tokenizer*"))  # the tower and its tokenizer are not copied
    w = wave(1.7, 2)
    clap_model.save(tmp_path / "copy")
    copy = load_model(str(tmp_path / "copy"), device="cpu")
    np.testing.assert_array_equal(copy.embed_audio(w, sample_rate=SR), clap_model.embed_audio(w, sample_rate=SR))
    # a tower inside the model directory is stored relative to it, so the pair can move together
    shutil.copytree(clip_dir, tmp_path / "copy" / "clip-text")
    copy.model.config.text_tower = str(tmp_path / "copy" / "clip-text")
    copy.save(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["config"]["text_tower"] == "clip-text"
    shutil.move(tmp_path / "copy", tmp_path / "moved")
    moved = load_model(str(tmp_path / "moved"), device="cpu")
    np.testing.assert_allclose(moved.embed_text(["a dog"]), clap_model.embed_text(["a dog"]), atol=1e-6)
    assert moved.fingerprint != clap_model.fingerprint  # another text tower reference, another model


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("w2c-library")
    for i, seconds in enumerate([0.8, 2.4, 3.1]):
        write_audio(root / f"s{i}.wav", tone_noise(seconds, sr=44_100, seed=10 + i), 44_100)
    return root


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_index_search_and_tag_timeline(model_dir, library, tmp_path):
    index_dir = tmp_path / "idx"
    clap("index", library, "--index", index_dir, "--model", model_dir, "--json")
    hits = json_lines(clap("search", "a dog barking", "--index", index_dir, "--json", "-k", "10").stdout)
    assert sorted(Path(h["path"]).name for h in hits) == ["s0.wav", "s1.wav", "s2.wav"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    by_name = {Path(h["path"]).name: h for h in hits}
    assert by_name["s2.wav"]["end"] - by_name["s2.wav"]["start"] == pytest.approx(1.0, abs=1e-3)  # a 1 s window
    assert by_name["s0.wav"]["start"] is None  # ≤ 1 s: the file alone

    from clapcli.engine.load import load_model

    m = load_model(str(model_dir), device="cpu")
    query = m.embed_text(["a dog barking"])[0]
    s1 = next(m.embed_files([library / "s1.wav"]))
    best = max([s1.embedding, *[s.embedding for s in s1.segments]], key=lambda v: float(v @ query))
    assert by_name["s1.wav"]["score"] == pytest.approx(float(best @ query), abs=1e-4)

    records = json_lines(clap("tag", library / "s0.wav", library / "s2.wav", "--labels", "dog,rain,siren",
                              "--json", "--timeline", "--model", model_dir, "--device", "cpu").stdout)
    assert records[0]["timeline"] == []
    windows = records[1]["timeline"]
    assert [(w["start"], w["end"]) for w in windows] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0),
                                                         (pytest.approx(2.1, abs=1e-3), pytest.approx(3.1, abs=1e-3))]
    for w in windows:
        assert sum(label["prob"] for label in w["labels"]) == pytest.approx(1.0, abs=1e-4)
    audio = next(m.embed_files([library / "s2.wav"])).embedding
    labels = m.embed_text([f"This is a sound of {x}." for x in ["dog", "rain", "siren"]])
    probs = np.exp(100 * labels @ audio) / np.exp(100 * labels @ audio).sum()
    assert {x["label"]: x["prob"] for x in records[1]["labels"]}["dog"] == pytest.approx(float(probs[0]), abs=1e-3)


def test_models_list_shows_wav2clip_and_finds_it_in_the_torch_hub_cache(tmp_path, monkeypatch, released):
    import shutil

    from clapcli.models.checkpoints import load_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def row():
        (found,) = [r for r in json_lines(clap("models", "list", "--json").stdout) if r["name"] == "wav2clip"]
        return found

    assert row()["architecture"] == "ResNet-18" and row()["dim"] == 512 and row()["fused"] is False
    assert row()["cached"] is False
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(released[0], tmp_path / "torch" / "hub" / "checkpoints" / "Wav2CLIP.pt")  # where the original caches it
    assert row()["cached"] is True
    assert load_checkpoint("wav2clip").model.config.text_tower == "openai/clip-vit-base-patch32"


def test_cli_embed_works_offline_without_the_text_tower_and_text_fails_in_one_line(library, tmp_path):
    from clapcli.models.checkpoints import save_own

    save_own(tiny_model("no-such-org/no-such-clip"), None, tmp_path / "m")
    (record,) = json_lines(clap("embed", library / "s1.wav", "--json", "--segments", "--model", tmp_path / "m").stdout)
    assert len(record["embedding"]) == 32 and len(record["segments"]) == 3
    failed = clap("embed", library / "s1.wav", "--text", "a dog", "--model", tmp_path / "m", ok=False)
    assert failed.exit_code == 1
    assert "CLIP text tower 'no-such-org/no-such-clip'" in str(failed.exception) + failed.output
