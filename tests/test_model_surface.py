"""The model's training surface: forward/ClapOutput, un-normalised embeddings, gradients, tower locks, gradient
checkpointing, the no-weight-decay rule, dropout knobs, presets, export keys, config round trips, tokenisation.

Every model here is the `tiny` preset (a few MB) with a 120-token vocabulary and random weights, on CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clapcli.errors import ClapError
from clapcli.models.clap import ClapModel, ClapOutput
from clapcli.models.config import AudioConfig, ClapConfig
from clapcli.models.presets import preset, preset_names

VOCAB = 120
B = 3


def tiny_config(**audio) -> ClapConfig:
    cfg = preset("tiny")
    cfg.text.vocab_size = VOCAB
    for key, value in audio.items():
        setattr(cfg.audio, key, value)
    return cfg


def tiny_model(cfg: ClapConfig | None = None, seed: int = 0) -> ClapModel:
    torch.manual_seed(seed)
    model = ClapModel(cfg or tiny_config())
    with torch.no_grad():  # distinct values, so exp(param) and param cannot be confused
        model.logit_scale_a.fill_(2.5)
        model.logit_scale_t.fill_(1.5)
    return model


def batch(seed: int = 0):
    """Fused mel features (B, 4, frames, mels) of the tiny preset's clip length, with two clips marked
    longer, and random token ids with padding."""
    cfg = tiny_config()
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(B, 4, cfg.frontend.clip_frames, cfg.audio.num_mel_bins, generator=gen) * 10 - 40
    is_longer = torch.tensor([True, True, False])
    ids = torch.randint(5, VOCAB, (B, 9), generator=gen)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = 1
    return features, is_longer, ids, mask


def contrastive_loss(out: ClapOutput) -> torch.Tensor:
    labels = torch.arange(out.audio_embeds.shape[0])
    per_audio = out.logit_scale_a * out.audio_embeds @ out.text_embeds.T
    per_text = out.logit_scale_t * out.text_embeds @ out.audio_embeds.T
    return (F.cross_entropy(per_audio, labels) + F.cross_entropy(per_text, labels)) / 2


def one_step(model: ClapModel, data) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    contrastive_loss(model(*data)).backward()
    optimizer.step()


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---- forward and encoders ----------------------------------------------------------------------------------


def test_forward_equals_the_encoders_and_exp_of_the_logit_scales():
    model = tiny_model().eval()
    features, is_longer, ids, mask = batch()
    with torch.no_grad():
        out = model(features, is_longer, ids, mask)
        audio = model.encode_audio(features, is_longer)
        text = model.encode_text(ids, mask)
    assert isinstance(out, ClapOutput)
    assert out.audio_embeds.shape == (B, 32) and out.text_embeds.shape == (B, 32)
    assert out.audio_embeds.dtype == torch.float32
    assert torch.allclose(out.audio_embeds, audio, atol=1e-6) and torch.allclose(out.text_embeds, text, atol=1e-6)
    assert torch.allclose(out.audio_embeds.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert out.logit_scale_a.ndim == 0 and out.logit_scale_t.ndim == 0
    assert out.logit_scale_a.item() == pytest.approx(torch.exp(torch.tensor(2.5)).item())
    assert out.logit_scale_t.item() == pytest.approx(torch.exp(torch.tensor(1.5)).item())


def test_normalize_false_returns_the_raw_projection():
    model = tiny_model().eval()
    features, is_longer, ids, mask = batch()
    with torch.no_grad():
        for raw, unit in (
            (model.encode_audio(features, is_longer, normalize=False), model.encode_audio(features, is_longer)),
            (model.encode_text(ids, mask, normalize=False), model.encode_text(ids, mask)),
        ):
            assert not torch.allclose(raw.norm(dim=-1), torch.ones(B), atol=1e-3)
            assert not torch.allclose(raw, unit, atol=1e-3)
            assert torch.allclose(F.normalize(raw, dim=-1), unit, atol=1e-6)


def test_gradients_reach_both_towers_heads_and_both_logit_scales():
    model = tiny_model().train()
    contrastive_loss(model(*batch())).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # every parameter is in the graph
    # and the gradient is really there (a conv bias right before a training-mode BatchNorm gets 0, rightly)
    params = dict(model.named_parameters())
    for name in (
        "logit_scale_a",
        "logit_scale_t",
        "audio_model.audio_encoder.batch_norm.weight",
        "audio_model.audio_encoder.patch_embed.proj.weight",
        "audio_model.audio_encoder.patch_embed.mel_conv2d.weight",  # the fusion path
        "audio_model.audio_encoder.patch_embed.fusion_model.local_att.0.weight",
        "audio_model.audio_encoder.layers.0.blocks.0.attention.self.query.weight",
        "audio_model.audio_encoder.layers.3.blocks.0.output.dense.weight",
        "audio_projection.linear1.weight",
        "text_model.embeddings.word_embeddings.weight",
        "text_model.encoder.layer.0.attention.self.query.weight",
        "text_model.pooler.dense.weight",
        "text_projection.linear2.weight",
    ):
        assert params[name].grad.abs().sum() > 0, name


def test_one_longer_clip_in_a_training_batch_runs_the_fusion_path():
    """AFF's BatchNorm after global pooling needs two values per channel in training; one clip is run twice.
    The longer clip's local crops (channels 1-3) reach its embedding through the fusion; a short clip's
    copies in those channels reach nothing."""
    model = tiny_model().train()
    features, _, ids, mask = batch()
    longer = torch.tensor([False, True, False])
    with torch.no_grad():
        out = model(features, longer, ids, mask)
        assert torch.isfinite(out.audio_embeds).all()
        for clip, fused in ((1, True), (0, False)):
            changed = features.clone()
            changed[clip, 1:] = torch.randn_like(changed[clip, 1:]) * 10 - 40  # other local crops
            again = model(changed, longer, ids, mask).audio_embeds
            assert torch.equal(again[clip], out.audio_embeds[clip]) is not fused, clip


# ---- tower locks --------------------------------------------------------------------------------------------


def test_lock_text_tower_freezes_it_in_eval_mode_while_the_rest_learns():
    cfg = tiny_config()
    cfg.text.hidden_dropout_prob = 0.5
    data = batch()
    unlocked = tiny_model(cfg).train()
    with torch.no_grad():  # the dropout is real: an unlocked tower in train mode is stochastic
        assert not torch.allclose(unlocked.encode_text(*data[2:]), unlocked.encode_text(*data[2:]))

    model = tiny_model(cfg)
    model.lock_text_tower()
    model.train()
    assert model.training and model.audio_model.training and model.text_projection.training
    assert not any(m.training for m in model.text_model.modules())
    assert not any(p.requires_grad for p in model.text_model.parameters())
    with torch.no_grad():  # dropout inactive inside the locked tower
        assert torch.equal(model.encode_text(*data[2:]), model.encode_text(*data[2:]))

    tower, head = params_of(model.text_model), params_of(model.text_projection)
    audio, scale = params_of(model.audio_model), model.logit_scale_t.detach().clone()
    one_step(model, data)
    assert all(torch.equal(v, model.text_model.state_dict()[k]) for k, v in tower.items())
    assert any(not torch.equal(v, model.text_projection.state_dict()[k]) for k, v in head.items())
    assert any(not torch.equal(v, model.audio_model.state_dict()[k]) for k, v in audio.items())
    assert not torch.equal(scale, model.logit_scale_t.detach())
    model.train(False)
    model.train(True)
    assert not model.text_model.training and model.audio_model.audio_encoder.training


def test_lock_audio_tower_freezes_it_in_eval_mode_while_the_rest_learns():
    cfg = tiny_config(drop_path_rate=0.5, drop_rate=0.2)
    data = batch()
    model = tiny_model(cfg)
    model.lock_audio_tower()
    model.train()
    encoder = model.audio_model.audio_encoder
    assert not any(m.training for m in encoder.modules())
    assert model.audio_projection.training and model.text_model.training
    assert not any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in model.audio_projection.parameters())
    with torch.no_grad():  # no drop path, no dropout, BatchNorm on running statistics
        assert torch.equal(model.encode_audio(*data[:2]), model.encode_audio(*data[:2]))

    tower, head, text = params_of(encoder), params_of(model.audio_projection), params_of(model.text_model)
    one_step(model, data)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in tower.items())  # BN running stats too
    assert any(not torch.equal(v, model.audio_projection.state_dict()[k]) for k, v in head.items())
    assert any(not torch.equal(v, model.text_model.state_dict()[k]) for k, v in text.items())


# ---- gradient checkpointing ---------------------------------------------------------------------------------


def count_forwards(model: ClapModel) -> dict[str, int]:
    """Calls of one Swin block's attention and one text layer's attention: a recomputed layer runs twice."""
    counts = {"audio": 0, "text": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1

        return hook

    model.audio_model.audio_encoder.layers[0].blocks[0].attention.register_forward_hook(counter("audio"))
    model.text_model.encoder.layer[0].attention.register_forward_hook(counter("text"))
    return counts


def test_grad_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_layers():
    plain = tiny_model().train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing(True)
    counts_plain, counts_ckpt = count_forwards(plain), count_forwards(checkpointed)
    data = batch()
    losses = []
    for model in (plain, checkpointed):
        loss = contrastive_loss(model(*data))
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    grads = dict(checkpointed.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name
    assert counts_plain == {"audio": 1, "text": 1}
    assert counts_ckpt == {"audio": 2, "text": 2}  # forward, then the recompute in backward

    checkpointed.eval()  # no recompute (and no checkpoint) without training
    with torch.no_grad():
        checkpointed(*data)
    assert counts_ckpt == {"audio": 3, "text": 3}
    checkpointed.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in checkpointed.audio_model.audio_encoder.layers)
    assert not any(layer.gradient_checkpointing for layer in checkpointed.text_model.encoder.layer)


def test_grad_checkpointing_goes_through_torch_checkpoint_per_swin_block(monkeypatch):
    import torch.utils.checkpoint as ckpt

    calls = []
    original = ckpt.checkpoint

    def spy(fn, *args, **kwargs):
        calls.append((type(fn).__name__, kwargs.get("use_reentrant")))
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(ckpt, "checkpoint", spy)
    model = tiny_model().train()
    model.set_grad_checkpointing(True)
    model.encode_audio(batch()[0], SHORT_CLIPS).sum().backward()
    assert calls == [("SwinBlock", False)] * sum(model.config.audio.depths)


# ---- weight decay ---------------------------------------------------------------------------------------------


def test_no_weight_decay_holds_scales_norms_biases_and_no_linear_or_conv_weight():
    model = tiny_model()
    no_decay = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert no_decay <= set(names)
    assert {"logit_scale_a", "logit_scale_t"} <= no_decay
    assert "audio_model.audio_encoder.norm.weight" in no_decay  # LayerNorm
    assert "audio_model.audio_encoder.batch_norm.weight" in no_decay  # BatchNorm
    assert "text_model.embeddings.LayerNorm.weight" in no_decay
    assert "text_model.embeddings.position_embeddings.weight" in no_decay
    assert "audio_model.audio_encoder.layers.0.blocks.0.attention.self.relative_position_bias_table" in no_decay
    assert all(n in no_decay for n in names if n.endswith("bias"))
    weights = [f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
               if isinstance(mod, (nn.Linear, nn.Conv2d))]
    assert len(weights) > 20 and not no_decay & set(weights)
    assert "text_model.embeddings.word_embeddings.weight" not in no_decay


# ---- dropout knobs ---------------------------------------------------------------------------------------------


SHORT_CLIPS = torch.tensor([False, False, False])


@pytest.fixture(scope="module")
def inert_outputs():
    """Audio embeddings of the default (knobs at 0) model: twice in train mode, once in eval mode."""
    features = batch()[0]
    model = tiny_model().train()
    with torch.no_grad():
        train = [model.encode_audio(features, SHORT_CLIPS) for _ in range(2)]
        return train, model.eval().encode_audio(features, SHORT_CLIPS)


def test_audio_is_deterministic_in_training_with_the_knobs_at_zero(inert_outputs):
    train, _ = inert_outputs  # so the randomness below comes from the knobs (BatchNorm uses batch statistics)
    assert torch.equal(train[0], train[1])


@pytest.mark.parametrize("knob", ["drop_path_rate", "drop_rate", "attn_drop_rate"])
def test_audio_dropout_knobs_are_stochastic_in_training_and_inert_in_eval(knob, inert_outputs):
    features = batch()[0]
    model = tiny_model(tiny_config(**{knob: 0.5})).train()
    with torch.no_grad():
        first, second = (model.encode_audio(features, SHORT_CLIPS) for _ in range(2))
        assert not torch.allclose(first, second, atol=1e-4)
        # same weights as the inert model: at inference the knob changes nothing
        assert torch.allclose(model.eval().encode_audio(features, SHORT_CLIPS), inert_outputs[1], atol=1e-6)


def test_drop_path_rises_linearly_over_the_blocks():
    model = tiny_model(tiny_config(drop_path_rate=0.3))
    rates = [b.drop_path.p for stage in model.audio_model.audio_encoder.layers for b in stage.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3])


def test_text_dropout_knobs_reach_the_transformers_config():
    assert tiny_model().text_model.config.hidden_dropout_prob == 0.0
    cfg = tiny_config()
    cfg.text.hidden_dropout_prob, cfg.text.attention_probs_dropout_prob = 0.1, 0.2
    tcfg = tiny_model(cfg).text_model.config
    assert (tcfg.hidden_dropout_prob, tcfg.attention_probs_dropout_prob) == (0.1, 0.2)


# ---- export keys ----------------------------------------------------------------------------------------------


def test_state_dict_keys_are_the_export_keys(tiny_fused, tmp_path):
    from safetensors.torch import load_file

    from clapcli.models.checkpoints import load_checkpoint, save_own
    from clapcli.models.weights import DERIVED_KEY

    model = tiny_model()
    keys = set(model.state_dict())
    assert not any(k.startswith("text_tower") for k in keys)
    assert {k.split(".")[0] for k in keys} == {
        "audio_model", "text_model", "audio_projection", "text_projection", "logit_scale_a", "logit_scale_t"}
    assert {"text_model." + k for k in model.text_model.state_dict()} <= keys
    assert "audio_projection.linear1.weight" in keys and "audio_model.audio_encoder.patch_embed.proj.weight" in keys
    save_own(model, None, tmp_path / "own")
    assert set(load_file(tmp_path / "own" / "model.safetensors")) == {k for k in keys if not DERIVED_KEY.search(k)}

    hub = load_checkpoint(tiny_fused[0])  # a transformers save_pretrained directory: the same names on disk
    on_disk = {k for k in load_file(tiny_fused[0] / "model.safetensors") if not DERIVED_KEY.search(k)}
    assert {k for k in hub.model.state_dict() if not DERIVED_KEY.search(k)} == on_disk


def test_own_format_written_before_still_loads(tiny_unfused, tmp_path):
    """An own-format config.json of the previous layout (audio hidden_size, dropout in text extra) loads."""
    import json

    from clapcli import load_model

    m = load_model(tiny_unfused[0], device="cpu")
    saved = m.save(tmp_path / "old")
    config = json.loads((saved / "config.json").read_text())
    config["config"]["audio"]["hidden_size"] = 128
    config["config"]["text"]["extra"] = {"hidden_dropout_prob": 0.1}
    del config["config"]["text"]["hidden_dropout_prob"]
    del config["config"]["frontend"]["extra"]
    (saved / "config.json").write_text(json.dumps(config))
    again = load_model(saved, device="cpu")
    assert again.config.text.hidden_dropout_prob == 0.1 and "hidden_dropout_prob" not in again.config.text.extra
    assert torch.allclose(torch.from_numpy(again.embed_text(["rain"])), torch.from_numpy(m.embed_text(["rain"])))

    config["config"]["audio"]["hidden_size"] = 96  # contradicts the encoder: refused, with the reason
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ClapError, match="hidden_size 96.*outputs 128"):
        load_model(saved, device="cpu")


# ---- configs and presets --------------------------------------------------------------------------------------


def test_foreign_config_fields_survive_a_round_trip():
    hf = {
        "audio_config": {"patch_embeds_hidden_size": 16, "depths": [1, 1, 1, 1], "hidden_size": 128,
                         "enable_fusion": True, "fusion_type": "aff_2d", "num_classes": 527},
        "text_config": {"hidden_size": 64, "hidden_dropout_prob": 0.1, "classifier_dropout": None,
                        "position_embedding_type": "absolute"},
        "projection_dim": 24,
    }
    pre = {"sampling_rate": 48_000, "truncation": "fusion", "padding": "repeatpad", "top_db": None}
    cfg = ClapConfig.from_hf_dict(hf, pre)
    assert cfg.audio.extra == {"fusion_type": "aff_2d", "num_classes": 527}
    assert cfg.text.extra == {"classifier_dropout": None, "position_embedding_type": "absolute"}
    assert cfg.text.hidden_dropout_prob == 0.1
    assert cfg.frontend.extra == {"truncation": "fusion", "padding": "repeatpad", "top_db": None}
    assert "extra" not in cfg.frontend.settings() and cfg.frontend.settings()["sample_rate"] == 48_000
    data = cfg.to_dict()
    assert "hidden_size" not in data["audio"]  # derived from the encoder, not stored
    again = ClapConfig.from_dict(data)
    assert again == cfg and again.to_dict() == data
    assert cfg.audio.out_width == 128


def test_audio_encoder_factory_and_its_width():
    from clapcli.models.config import AUDIO_OUTPUT_WIDTHS
    from clapcli.models.encoders import AUDIO_ENCODERS, build_audio_encoder

    cfg = tiny_config().audio
    encoder = build_audio_encoder(cfg)
    assert encoder.out_width == cfg.out_width == 128
    assert ClapModel(tiny_config()).audio_projection.linear1.in_features == 128
    assert preset("htsat-base").audio.out_width == 1024 and preset("htsat-tiny").audio.out_width == 768
    with pytest.raises(ClapError, match="unknown audio encoder 'pann10'; choose one of: .*htsat"):
        build_audio_encoder(AudioConfig(encoder="pann10"))
    assert "htsat" in AUDIO_ENCODERS and "cnn14" in AUDIO_ENCODERS
    assert set(AUDIO_ENCODERS) == set(AUDIO_OUTPUT_WIDTHS)  # every encoder has its width formula in config.py


def test_presets_are_data_and_an_unknown_name_lists_them():
    assert {"htsat-base", "htsat-base-fused", "htsat-tiny", "htsat-tiny-fused", "tiny", "tiny-unfused",
            "pann14-roberta", "pann14-roberta-fusion", "tiny-pann", "tiny-pann-fused", "tiny-bert",
            "tiny-clip", "tiny-wav2clip", "wav2clip"} <= set(preset_names())
    assert preset_names() == sorted(preset_names())
    with pytest.raises(ClapError) as info:
        preset("htsat-large")
    assert "choose one of: " + ", ".join(preset_names()) in str(info.value)
    tiny = preset("tiny")
    assert tiny.fused and tiny.audio.depths == [2, 2, 2, 1] and tiny.audio.num_attention_heads == [1, 2, 2, 4]
    assert tiny.audio.patch_embeds_hidden_size == 16 and tiny.projection_dim == 32
    assert (tiny.text.hidden_size, tiny.text.num_hidden_layers, tiny.text.num_attention_heads) == (64, 2, 2)
    assert (tiny.text.intermediate_size, tiny.text.max_position_embeddings) == (128, 82)
    assert not preset("tiny-unfused").fused and preset("tiny-unfused").frontend.mel_scale == "slaney"
    base_fused = preset("htsat-base-fused")
    assert base_fused.fused and base_fused.audio.patch_embeds_hidden_size == 128
    assert base_fused.audio.depths == [2, 2, 12, 2] and base_fused.frontend.mel_scale == "htk"
    tiny.audio.depths.append(9)  # presets hand out copies
    assert preset("tiny").audio.depths == [2, 2, 2, 1]


# ---- tokenisation ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from tiny_models import train_tokenizer

    return train_tokenizer()


def test_tokenize_truncates_at_the_limit_and_pads_as_asked(tokenizer):
    from clapcli.models.text import tokenize

    texts = ["rain", "glass " * 200]
    longest = tokenize(tokenizer, texts, max_length=77)
    assert set(longest) == {"input_ids", "attention_mask"}
    assert longest["input_ids"].shape == (2, 77) and longest["input_ids"][1, -1].item() == tokenizer.eos_token_id
    assert longest["attention_mask"][0].sum() < 77 and longest["attention_mask"][1].sum() == 77
    short = tokenize(tokenizer, ["rain", "a dog"], max_length=77)
    assert short["input_ids"].shape[1] < 10  # "longest" pads to the batch, not the limit
    fixed = tokenize(tokenizer, ["rain"], max_length=16, padding="max_length")
    assert fixed["input_ids"].shape == (1, 16) and fixed["attention_mask"].sum() < 16
    with pytest.raises(ValueError, match="padding"):
        tokenize(tokenizer, ["rain"], max_length=16, padding="do_not_pad")


def test_embed_text_goes_through_tokenize(tiny_fused, monkeypatch):
    import clapcli.models.text as text
    from clapcli import load_model

    seen = []
    original = text.tokenize

    def spy(tok, texts, max_length, padding="longest"):
        seen.append((list(texts), max_length))
        return original(tok, texts, max_length, padding)

    monkeypatch.setattr(text, "tokenize", spy)
    m = load_model(tiny_fused[0], device="cpu")
    m.embed_text(["a dog", "rain"])
    assert seen == [(["a dog", "rain"], 77)]
