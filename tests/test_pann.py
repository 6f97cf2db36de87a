"""PANN CNN14 (unfused and with aff_2d fusion): shapes, determinism, batch independence, the fusion rule, our
own format, original LAION-format checkpoints against a functional re-computation, `--audio-init`, and a tiny
PANN model trained and used through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from audio_synth import tone_noise
from cli_runner import clap
from clapcli import load_model
from clapcli.errors import CheckpointError, UsageError
from clapcli.models.checkpoints import load_checkpoint, save_own
from clapcli.models.clap import ClapModel
from clapcli.models.presets import preset
from tiny_models import randomise_batchnorm, train_tokenizer

SR = 48_000
CHANNELS = [4, 8, 8, 16, 16, 24]  # a CNN14 small enough to run on 1001-frame mels in milliseconds


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def calibrate_batchnorm(encoder: torch.nn.Module, cfg, seed: int = 0) -> None:
    """BatchNorm statistics as a trained CNN14 has them: `bn0` per mel bin on a dB scale, every other layer
    measured on a batch (random statistics would saturate the ReLUs and make every clip look alike)."""
    gen = torch.Generator().manual_seed(seed)
    for m in encoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
            m.weight.data.copy_(1.0 + 0.2 * torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(0.2 * torch.randn(m.num_features, generator=gen))
    encoder.train()
    with torch.no_grad():
        encoder(features(cfg, 8, seed=seed + 100), torch.ones(8, dtype=torch.bool))
    encoder.eval()
    encoder.bn0.running_mean.copy_(-40 + 3 * torch.randn(cfg.audio.num_mel_bins, generator=gen))
    encoder.bn0.running_var.copy_(100 * (0.5 + torch.rand(cfg.audio.num_mel_bins, generator=gen)))


def pann_model(fused: bool, tokenizer, seed: int = 0) -> ClapModel:
    cfg = preset("tiny-pann-fused" if fused else "tiny-pann")
    cfg.text.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = ClapModel(cfg)
    calibrate_batchnorm(model.audio_model.audio_encoder, cfg, seed)
    return model.eval()


def features(cfg, n: int, seed: int = 0) -> torch.Tensor:
    return mels(n, 4 if cfg.fused else 1, cfg.frontend.clip_frames, cfg.audio.num_mel_bins, seed)


def mels(n: int, channels: int, frames: int, bins: int, seed: int = 0) -> torch.Tensor:
    """dB-scale mels (n, C, frames, bins): noise over a spectral profile and a level envelope of each clip."""
    gen = torch.Generator().manual_seed(seed)
    profile = 15 * torch.randn(n, channels, 1, bins, generator=gen)
    envelope = 10 * torch.sin(torch.linspace(0, 6, frames)[None, None, :, None] * (1 + torch.rand(n, channels, 1, 1,
                                                                                                  generator=gen)))
    return torch.randn(n, channels, frames, bins, generator=gen) * 5 - 40 + profile + envelope


# ---- the encoder -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True])
def test_shapes_determinism_and_batch_independence(fused, tokenizer):
    model = pann_model(fused, tokenizer)
    x = features(model.config, 3)
    longer = torch.tensor([True, False, True])
    with torch.no_grad():
        pooled = model.audio_model.audio_encoder(x, longer)
        a = model.encode_audio(x, longer)
        again = model.encode_audio(x, longer)
        alone = torch.cat([model.encode_audio(x[i : i + 1], longer[i : i + 1]) for i in range(3)])
    assert pooled.shape == (3, 64) and a.shape == (3, 32)
    assert torch.allclose(a.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(a, again)
    assert torch.allclose(a, alone, atol=1e-5)
    assert not torch.allclose(a[0], a[2], atol=1e-3)


def test_full_size_cnn14_has_the_original_layers():
    """pann14-roberta(-fusion): the original's tensor names and shapes, 2048 out, ~80 M audio parameters."""
    with torch.device("meta"):
        enc = ClapModel(preset("pann14-roberta-fusion")).audio_model.audio_encoder
        plain = ClapModel(preset("pann14-roberta")).audio_model.audio_encoder
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert enc.out_width == 2048 and shapes["fc1.weight"] == (2048, 2048)
    assert shapes["conv_block1.conv1.weight"] == (64, 1, 3, 3)
    assert shapes["conv_block6.conv2.weight"] == (2048, 2048, 3, 3)
    assert "conv_block1.conv1.bias" not in shapes and shapes["bn0.running_mean"] == (64,)
    assert shapes["mel_conv2d.0.weight"] == (64, 1, 5, 5) and shapes["mel_conv2d.1.running_var"] == (64,)
    assert shapes["fusion_model.local_att.0.weight"] == (16, 64, 1, 1)
    assert not any(k.startswith(("mel_conv2d", "fusion_model")) for k in plain.state_dict())
    assert not any("fc_audioset" in k for k in shapes)
    n = sum(p.numel() for p in plain.parameters())
    assert 79e6 < n < 80e6, n  # CNN14's 80.75 M less fc_audioset (2048·527 + 527)


def test_fusion_maps_have_the_original_sizes_on_10_s_mels(tokenizer):
    """On 1001 frames: global block-1 map (500, 32); each crop (167, 32), joined to 501 and cut to 500."""
    cfg = preset("tiny-pann-fused")
    cfg.audio.pann_channels = CHANNELS
    cfg.frontend.clip_samples = 480_000
    cfg.text.vocab_size = len(tokenizer)
    enc = ClapModel(cfg).eval().audio_model.audio_encoder
    seen = {}
    enc.mel_conv2d.register_forward_hook(lambda m, i, o: seen.update(crop=tuple(o.shape)))
    enc.fusion_model.register_forward_hook(lambda m, i, o: seen.update(aff=(tuple(i[0].shape), tuple(i[1].shape))))
    with torch.no_grad():
        enc(features(cfg, 2), torch.tensor([False, True]))
    assert seen["crop"] == (3, 4, 167, 32)
    assert seen["aff"] == ((1, 4, 500, 32), (1, 4, 500, 32))


def test_fused_model_uses_the_crops_only_for_long_input(tokenizer, tmp_path):
    """> clip length: the local crops change the embedding; ≤ clip length: the global path alone, the local
    channels are never read."""
    model = pann_model(True, tokenizer, seed=3)
    m = load_model(save_own(model, tokenizer, tmp_path / "m"), device="cpu", precision="fp32")
    clip_s = model.config.frontend.clip_samples / SR
    long_wave = tone_noise(3 * clip_s, SR, seed=1)
    a = m.embed_waveforms([long_wave], segments=False, crop_starts=[(0, 200, 400)])[0].embedding
    b = m.embed_waveforms([long_wave], segments=False, crop_starts=[(50, 300, 500)])[0].embedding
    assert not np.allclose(a, b, atol=1e-4)

    x = features(model.config, 2, seed=5)
    noisy = x.clone()
    noisy[:, 1:] = torch.randn_like(noisy[:, 1:]) * 20
    short = torch.tensor([False, False])
    with torch.no_grad():
        assert torch.equal(model.encode_audio(x, short), model.encode_audio(noisy, short))
        assert not torch.allclose(model.encode_audio(x, ~short), model.encode_audio(noisy, ~short), atol=1e-4)
        assert torch.allclose(model.encode_audio(x, None), model.encode_audio(x, short))


@pytest.mark.parametrize("fused", [False, True])
def test_own_format_round_trip(fused, tokenizer, tmp_path):
    model = pann_model(fused, tokenizer, seed=4)
    m = load_model(save_own(model, tokenizer, tmp_path / "m"), device="cpu", precision="fp32")
    assert m.config.audio.encoder == "cnn14" and m.config.audio.pann_channels == [8, 16, 16, 32, 32, 64]
    assert m.fused == fused and m.loaded.kind == "clapcli"
    clip_s = model.config.frontend.clip_samples / SR
    waves = [tone_noise(1.0, SR, seed=1), tone_noise(clip_s, SR, seed=2)]
    x, longer = m.features.clip_features(waves)
    with torch.no_grad():
        direct = model.encode_audio(x, longer).numpy()
    got = np.stack([e.embedding for e in m.embed_waveforms(waves)])
    assert np.allclose(got, direct, atol=1e-5)
    again = load_model(m.save(tmp_path / "again"), device="cpu", precision="fp32")
    assert np.allclose(np.stack([e.embedding for e in again.embed_waveforms(waves)]), got, atol=1e-6)
    assert np.allclose(again.embed_text(["rain on a roof"]), m.embed_text(["rain on a roof"]), atol=1e-6)


# ---- original LAION checkpoints --------------------------------------------------------------------------------


def _bn(sd: dict, prefix: str, n: int, gen: torch.Generator) -> None:
    sd[prefix + "weight"] = 1 + 0.2 * torch.randn(n, generator=gen)
    sd[prefix + "bias"] = 0.2 * torch.randn(n, generator=gen)
    sd[prefix + "running_mean"] = torch.randn(n, generator=gen) * 0.5
    sd[prefix + "running_var"] = torch.rand(n, generator=gen) + 0.5
    sd[prefix + "num_batches_tracked"] = torch.tensor(1000)


def laion_pann_state(fused: bool, tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LAION-CLAP PANN-14 state dict written from the spec (reference/laion_clap.md §1.4, §3, §6), with
    the original names: `audio_branch.` CNN14 (+ torchlibrosa front-end buffers and the AudioSet head),
    sequential `mel_conv2d.0/.1` and AFF `fusion_model` when fused, a RoBERTa `text_branch`, `.0/.2`
    projections, the MLP-loss transforms and the logit scales."""
    from transformers import RobertaConfig, RobertaModel

    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen) * (2.0 / np.prod(s[1:])) ** 0.5  # noqa: E731
    a = "audio_branch."
    sd: dict[str, torch.Tensor] = {
        a + "spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024),
        a + "spectrogram_extractor.stft.conv_imag.weight": torch.randn(513, 1, 1024),
        a + "logmel_extractor.melW": torch.rand(513, 64),
    }
    bn0 = a + "bn0."
    _bn(sd, bn0, 64, gen)
    sd[bn0 + "running_mean"] = torch.randn(64, generator=gen) * 3 - 40  # a dB-scale mean, per mel bin
    sd[bn0 + "running_var"] = torch.rand(64, generator=gen) * 30 + 20
    for i, (c_in, c_out) in enumerate(zip([1] + CHANNELS[:-1], CHANNELS), start=1):
        p = f"{a}conv_block{i}."
        sd[p + "conv1.weight"] = rnd(c_out, c_in, 3, 3)
        sd[p + "conv2.weight"] = rnd(c_out, c_out, 3, 3)
        _bn(sd, p + "bn1.", c_out, gen)
        _bn(sd, p + "bn2.", c_out, gen)
    width = CHANNELS[-1]
    sd[a + "fc1.weight"], sd[a + "fc1.bias"] = rnd(width, width), 0.1 * torch.randn(width, generator=gen)
    sd[a + "fc_audioset.weight"], sd[a + "fc_audioset.bias"] = rnd(527, width), torch.zeros(527)
    if fused:
        c0, inter = CHANNELS[0], CHANNELS[0] // 4
        sd[a + "mel_conv2d.0.weight"] = rnd(c0, 1, 5, 5)
        sd[a + "mel_conv2d.0.bias"] = 0.1 * torch.randn(c0, generator=gen)
        _bn(sd, a + "mel_conv2d.1.", c0, gen)
        for branch, (c1, b1, c2, b2) in (("local_att", (0, 1, 3, 4)), ("global_att", (1, 2, 4, 5))):
            p = f"{a}fusion_model.{branch}."
            sd[f"{p}{c1}.weight"], sd[f"{p}{c1}.bias"] = rnd(inter, c0, 1, 1), 0.1 * torch.randn(inter, generator=gen)
            _bn(sd, f"{p}{b1}.", inter, gen)
            sd[f"{p}{c2}.weight"], sd[f"{p}{c2}.bias"] = rnd(c0, inter, 1, 1), 0.1 * torch.randn(c0, generator=gen)
            _bn(sd, f"{p}{b2}.", c0, gen)
    torch.manual_seed(seed)
    roberta = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=96, max_position_embeddings=82,
                                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1),
                           add_pooling_layer=True)
    sd.update({"text_branch." + k: v for k, v in roberta.state_dict().items()})
    sd["text_branch.embeddings.position_ids"] = torch.arange(82)[None]
    for side, d_in in (("audio", width), ("text", 128)):
        sd[f"{side}_projection.0.weight"], sd[f"{side}_projection.0.bias"] = rnd(24, d_in), torch.zeros(24)
        sd[f"{side}_projection.2.weight"], sd[f"{side}_projection.2.bias"] = rnd(24, 24), torch.zeros(24)
        sd[f"{side}_transform.sequential.0.weight"] = rnd(24, 24)
        sd[f"{side}_transform.sequential.3.bias"] = torch.zeros(24)
    sd["logit_scale_a"], sd["logit_scale_t"] = torch.tensor(4.2), torch.tensor(3.9)
    # BatchNorm statistics as training leaves them (random ones saturate the ReLUs and make clips alike)
    reference_audio_embedding(sd, mels(6, 4 if fused else 1, 1001, 64, seed + 1), torch.ones(6, dtype=torch.bool),
                              fused, calibrate=True)
    return {"module." + k: v for k, v in sd.items()}


def reference_audio_embedding(sd: dict, x: torch.Tensor, longer: torch.Tensor, fused: bool,
                              calibrate: bool = False) -> torch.Tensor:
    """LAION-CLAP's Cnn14.forward + audio_projection, written out functionally from the original layer order.
    `calibrate`: set every BatchNorm's running statistics in `sd` to those of this batch first."""
    if not calibrate:
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    a = "audio_branch."

    def bn(t, p):
        if calibrate:
            sd[p + "running_mean"] = t.mean(dim=(0, 2, 3))
            sd[p + "running_var"] = t.var(dim=(0, 2, 3)) + 0.1
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0.0, 1e-5)

    def conv_block(t, i, pool):
        p = f"{a}conv_block{i}."
        t = F.relu(bn(F.conv2d(t, sd[p + "conv1.weight"], padding=(1, 1)), p + "bn1."))
        t = F.relu(bn(F.conv2d(t, sd[p + "conv2.weight"], padding=(1, 1)), p + "bn2."))
        return F.avg_pool2d(t, kernel_size=pool)

    def conv1x1(t, p):
        return F.conv2d(t, sd[p + "weight"], sd[p + "bias"])

    def aff(g, loc):
        p = a + "fusion_model."
        xa = g + loc
        xl = conv1x1(F.relu(bn(conv1x1(xa, p + "local_att.0."), p + "local_att.1.")), p + "local_att.3.")
        xl = bn(xl, p + "local_att.4.")
        xg = F.adaptive_avg_pool2d(xa, 1)
        xg = conv1x1(F.relu(bn(conv1x1(xg, p + "global_att.1."), p + "global_att.2.")), p + "global_att.4.")
        xg = bn(xg, p + "global_att.5.")
        w = torch.sigmoid(xl + xg)
        return 2 * g * w + 2 * loc * (1 - w)

    x = bn(x.transpose(1, 3), a + "bn0.").transpose(1, 3)
    if fused:
        global_x = conv_block(x[:, 0:1], 1, (2, 2))
        idx = torch.where(longer)[0]
        if len(idx) > 0:
            local_x = x[idx, 1:, :, :].contiguous()
            th = global_x.size(-2)
            b, c, h, w = local_x.shape
            local_x = local_x.view(b * c, 1, h, w)
            local_x = F.conv2d(local_x, sd[a + "mel_conv2d.0.weight"], sd[a + "mel_conv2d.0.bias"], stride=(6, 2),
                               padding=(2, 2))
            local_x = F.relu(bn(local_x, a + "mel_conv2d.1."))
            local_x = local_x.view(b, c, local_x.size(1), local_x.size(2), local_x.size(3))
            local_x = local_x.permute((0, 2, 1, 3, 4)).contiguous().flatten(2, 3)
            tb, tc, _, tw = local_x.size()
            if local_x.size(-2) < th:
                local_x = torch.cat([local_x, torch.zeros((tb, tc, th - local_x.size(-2), tw))], dim=-2)
            else:
                local_x = local_x[:, :, :th, :]
            global_x[idx] = aff(global_x[idx], local_x)
        x = global_x
    else:
        x = conv_block(x, 1, (2, 2))
    for i in range(2, 6):
        x = conv_block(x, i, (2, 2))
    x = conv_block(x, 6, (1, 1))
    x = torch.mean(x, dim=3)
    (x1, _) = torch.max(x, dim=2)
    x = x1 + torch.mean(x, dim=2)
    embedding = F.relu(F.linear(x, sd[a + "fc1.weight"], sd[a + "fc1.bias"]))
    h = F.relu(F.linear(embedding, sd["audio_projection.0.weight"], sd["audio_projection.0.bias"]))
    return F.normalize(F.linear(h, sd["audio_projection.2.weight"], sd["audio_projection.2.bias"]), dim=-1)


@pytest.mark.parametrize("fused", [False, True])
def test_laion_pann_checkpoint_loads_strictly_and_matches_the_original_forward(fused, tokenizer, tmp_path):
    from transformers import RobertaConfig, RobertaModel

    state = laion_pann_state(fused, tokenizer, seed=11)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    path = tmp_path / "pann14.pt"
    torch.save({"epoch": 40, "name": "pann", "state_dict": state}, path)
    loaded = load_checkpoint(path, tokenizer=str(tok_dir))
    model, cfg = loaded.model, loaded.model.config
    assert loaded.kind == "laion" and cfg.audio.encoder == "cnn14" and cfg.audio.pann_channels == CHANNELS
    assert cfg.fused == fused and cfg.frontend.mel_scale == ("htk" if fused else "slaney")

    x = features(cfg, 3, seed=3)  # full 10 s mels: (3, C, 1001, 64)
    assert x.shape[2] == 1001
    longer = torch.tensor([True, False, True])
    with torch.no_grad():
        ours = model.encode_audio(x, longer)
        ref = reference_audio_embedding(state, x, longer, fused)
    assert not torch.allclose(ref[0], ref[2], atol=1e-2)  # the weights do not make every clip alike
    assert (ours * ref).sum(1).min() >= 0.99999, (ours * ref).sum(1)
    assert torch.allclose(ours, ref, atol=1e-5)

    ids = tokenizer(["a dog barking", "rain"], padding=True, return_tensors="pt")
    roberta = RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=96, max_position_embeddings=82,
                                         type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1)).eval()
    sd = {k.removeprefix("module."): v for k, v in state.items()}
    roberta.load_state_dict({k[len("text_branch."):]: v for k, v in sd.items()
                             if k.startswith("text_branch.") and not k.endswith("position_ids")})
    with torch.no_grad():
        pooled = roberta(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).pooler_output
        t_ref = F.linear(F.relu(F.linear(pooled, sd["text_projection.0.weight"], sd["text_projection.0.bias"])),
                         sd["text_projection.2.weight"], sd["text_projection.2.bias"])
        t = model.encode_text(ids["input_ids"], ids["attention_mask"])
    assert torch.allclose(t, F.normalize(t_ref, dim=-1), atol=1e-5)


def test_laion_pann_checkpoint_mismatch_is_a_readable_diff(tokenizer, tmp_path):
    state = laion_pann_state(True, tokenizer)
    del state["module.audio_branch.fusion_model.global_att.4.weight"]
    state["module.audio_branch.conv_block3.conv2.weight"] = torch.zeros(8, 8, 5, 5)
    path = tmp_path / "broken.pt"
    torch.save({"state_dict": state}, path)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, tokenizer=str(tok_dir))
    msg = str(info.value)
    assert "1 missing from the checkpoint" in msg
    assert "audio_model.audio_encoder.fusion_model.global_att.4.weight" in msg
    assert "audio_model.audio_encoder.conv_block3.conv2.weight: checkpoint (8, 8, 5, 5) vs model (8, 8, 3, 3)" in msg


# ---- --audio-init ----------------------------------------------------------------------------------------------


def audioset_cnn14(channels: list[int] | None = None, seed: int = 5) -> dict[str, torch.Tensor]:
    """Random weights in the PANN repository's Cnn14 layout (bare names, front-end buffers, fc_audioset)."""
    from clapcli.models.encoders import build_audio_encoder

    cfg = preset("tiny-pann")
    cfg.audio.pann_channels = channels or cfg.audio.pann_channels
    torch.manual_seed(seed)
    enc = build_audio_encoder(cfg.audio)
    calibrate_batchnorm(enc, cfg, seed)
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    width = cfg.audio.pann_channels[-1]
    state.update({"spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024),
                  "spectrogram_extractor.stft.conv_imag.weight": torch.randn(513, 1, 1024),
                  "logmel_extractor.melW": torch.rand(513, 64),
                  "fc_audioset.weight": torch.randn(527, width), "fc_audioset.bias": torch.zeros(527)})
    return state


def test_audio_init_loads_pann_and_lightning_layouts_strictly(tokenizer, tmp_path):
    from clapcli.train.prepare import init_audio_encoder
    from test_checkpoints import laion_state_dict

    state = audioset_cnn14()
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save({"model": state, "iteration": 660000}, path)
    model = pann_model(True, tokenizer, seed=9)  # fused: its fusion layers are not in AudioSet weights
    random = init_audio_encoder(model, str(path), "tiny-pann-fused")
    enc = model.audio_model.audio_encoder.state_dict()
    assert random and all(k.startswith(("fusion_model.", "mel_conv2d.")) for k in random)
    assert len(random) == sum(k.startswith(("fusion_model.", "mel_conv2d.")) for k in enc)
    for key in ("bn0.running_mean", "conv_block1.conv1.weight", "conv_block6.bn2.running_var", "fc1.bias"):
        assert torch.equal(enc[key], state[key]), key

    # HTSAT from a Lightning checkpoint of the HTSAT code base: sed_model.* in the original HTSAT names
    source = ClapModel(preset("tiny-unfused"))
    randomise_batchnorm(source, 2)
    original = {k.removeprefix("module.audio_branch."): v for k, v in laion_state_dict(source).items()
                if k.startswith("module.audio_branch.")}
    lightning = tmp_path / "HTSAT_AudioSet_Saved_1.ckpt"
    torch.save({"state_dict": {"sed_model." + k: v for k, v in original.items()}}, lightning)
    cfg = preset("tiny")
    cfg.text.vocab_size = len(tokenizer)
    htsat = ClapModel(cfg)
    random = init_audio_encoder(htsat, str(lightning), "tiny")
    assert random and all(k.startswith("patch_embed.") for k in random)
    got, want = htsat.audio_model.audio_encoder.state_dict(), source.audio_model.audio_encoder.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)

    wrong = tmp_path / "Cnn14_wide.pth"
    torch.save({"model": audioset_cnn14([16, 16, 16, 32, 32, 64])}, wrong)
    with pytest.raises(UsageError) as info:
        init_audio_encoder(pann_model(False, tokenizer), str(wrong), "tiny-pann")
    msg = str(info.value)
    assert "\n" not in msg and "does not fit the cnn14 audio encoder of --model-config tiny-pann" in msg
    assert "conv_block1.conv1.weight: checkpoint (16, 1, 3, 3) vs model (8, 1, 3, 3)" in msg


# ---- through the CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from train_data import make_dataset, make_tokenizer

    root = tmp_path_factory.mktemp("toy")
    manifest = make_dataset(root, per_kind=4)
    make_tokenizer(root / "tok")
    clap("shards", "make", manifest, "--out", root / "shards", "--shard-size", "8", "--seed", "1")
    return root


def test_tiny_pann_trains_from_audio_init_then_tags_indexes_and_searches(toy, tmp_path):
    init = tmp_path / "Cnn14.pth"
    state = audioset_cnn14()
    torch.save({"model": state}, init)
    run = tmp_path / "run"
    clap("train", "--data", toy / "shards", "--tokenizer", toy / "tok", "--out", run, "--model-config", "tiny-pann",
         "--audio-init", init, "--freeze-audio", "--workers", "0", "--batch-size", "4", "--max-steps", "3",
         "--lr", "1e-3", "--warmup", "1", "--log-every", "1")
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["audio_init"] == {"path": str(init), "random": []}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 3
    m = load_model(run / "final", device="cpu")
    assert m.config.audio.encoder == "cnn14" and not m.fused
    enc = m.model.audio_model.audio_encoder.state_dict()
    assert torch.equal(enc["conv_block2.conv1.weight"], state["conv_block2.conv1.weight"])  # frozen at the init

    result = clap("tag", toy / "audio" / "hum_000.wav", "--model", run / "final", "--labels",
                  "a low hum,a high whistle,static hiss", "--json")
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and {t["label"] for t in rows[0]["labels"]} == {"a low hum", "a high whistle", "static hiss"}

    clap("index", toy / "audio", "--index", tmp_path / "index", "--model", run / "final")
    result = clap("search", "a low humming drone", "--index", tmp_path / "index", "--json", "-k", "3")
    hits = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(hits) == 3 and all(h["path"].endswith(".wav") for h in hits)


def test_audio_init_of_a_fused_preset_warns_that_the_fusion_layers_start_random(toy, tmp_path):
    init = tmp_path / "Cnn14.pth"
    torch.save({"model": audioset_cnn14()}, init)
    run = tmp_path / "run"
    clap("train", "--data", toy / "shards", "--tokenizer", toy / "tok", "--out", run, "--model-config",
         "tiny-pann-fused", "--audio-init", init, "--workers", "0", "--batch-size", "4", "--max-steps", "1")
    random = json.loads((run / "config.json").read_text())["model"]["audio_init"]["random"]
    assert "fusion_model.local_att.0.weight" in random and "mel_conv2d.0.weight" in random
    warnings = [json.loads(line)["warning"] for line in (run / "log.jsonl").read_text().splitlines()
                if "warning" in json.loads(line)]
    assert any(f"{len(random)} fusion tensors" in w and "start random" in w for w in warnings), warnings
    m = load_model(run / "final", device="cpu")
    assert m.fused and m.config.audio.encoder == "cnn14"


def test_audio_init_mismatch_is_a_one_line_usage_error(toy, tmp_path, monkeypatch, capsys):
    from test_errors import run_main

    wrong = tmp_path / "Cnn14.pth"
    torch.save({"model": audioset_cnn14([16, 16, 16, 32, 32, 64])}, wrong)
    code, err = run_main(monkeypatch, capsys, "train", "--data", toy / "shards", "--tokenizer", toy / "tok",
                         "--out", tmp_path / "run", "--model-config", "tiny-pann", "--audio-init", wrong,
                         "--workers", "0", "--max-steps", "1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--audio-init" in lines[0] and "shape mismatches" in lines[0], err


def test_full_finetune_of_a_fused_pann_model(tokenizer, tmp_path):
    from safetensors.torch import load_file

    from clapcli import load_classifier
    from test_finetune import class_folders

    base = save_own(pann_model(True, tokenizer, seed=2), tokenizer, tmp_path / "base")
    class_folders(tmp_path / "data", per_kind=2, seed=7)
    clap("finetune", "--data", tmp_path / "data", "--model", base, "--out", tmp_path / "clf", "--full",
         "--epochs", "1", "--batch-size", "4", "--encoder-lr", "1e-3", "--device", "cpu", "--json")
    before = load_file(str(base / "model.safetensors"))
    tuned = load_file(str(tmp_path / "clf" / "model" / "model.safetensors"))
    changed = [k for k in tuned if k.startswith("audio_model.") and not before[k].equal(tuned[k])]
    assert any(".conv_block1.conv1." in k for k in changed) and any(".fc1." in k for k in changed)
    probs = load_classifier(tmp_path / "clf", device="cpu").classify_files(sorted((tmp_path / "data").rglob("*.wav")))
    assert probs.shape == (8, 4) and np.isfinite(probs).all()


def test_models_presets_lists_the_pann_and_text_tower_presets_with_a_description():
    rows = {r["name"]: r for r in map(json.loads, clap("models", "presets", "--json").output.splitlines())}
    full = rows["pann14-roberta-fusion"]
    assert full["audio"] == "cnn14 64-128-256-512-1024-2048" and full["fused"] and full["dim"] == 512
    assert rows["tiny-pann"]["audio"] == "cnn14 8-16-16-32-32-64" and not rows["tiny-pann"]["fused"]
    assert rows["tiny-clip"]["text"].startswith("clip_text_model") and rows["tiny-bert"]["text"].startswith("bert")
    assert all(r["description"] and "\n" not in r["description"] for r in rows.values())
