"""Checkpoint formats: original LAION .pt (with its own key names), our own format, safety and errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from audio_synth import tone_noise
from hf_replay import replay_hf_fusion_crops
from clapcli import load_model
from clapcli.errors import CheckpointError

SR = 48_000


def laion_state_dict(hf_model) -> dict[str, torch.Tensor]:
    """Write a transformers CLAP state dict under the original LAION-CLAP names (DDP `module.` prefix,
    fused qkv, `attn.proj`, `mlp.fc1/fc2`, `norm1/norm2`, `bn0`, `*_projection.0/.2`) plus the tensors
    the original carries that inference does not use."""
    sd = hf_model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith("audio_model.") and key.endswith(("attention.self.key.weight", "attention.self.key.bias",
                         "attention.self.value.weight", "attention.self.value.bias")):
            continue
        new = key.replace("text_model.", "text_branch.").replace("audio_model.audio_encoder.", "audio_branch.")
        if new.startswith("audio_branch."):
            new = new.replace("batch_norm", "bn0").replace("layernorm_before", "norm1")
            new = new.replace("layernorm_after", "norm2").replace("attention.output.dense", "attn.proj")
            new = new.replace("intermediate.dense", "mlp.fc1").replace(".output.dense", ".mlp.fc2")
            new = new.replace("attention.self.", "attn.")
            if ".attn.query." in new:
                kind = new.rsplit(".", 1)[1]
                prefix = key.rsplit(".", 2)[0]
                value = torch.cat([sd[f"{prefix}.{p}.{kind}"] for p in ("query", "key", "value")])
                new = new.replace(".attn.query.", ".attn.qkv.")
        new = re.sub(r"_projection\.linear1\.", "_projection.0.", new)
        new = re.sub(r"_projection\.linear2\.", "_projection.2.", new)
        out["module." + new] = value.clone()
    extra = {
        "audio_branch.spectrogram_extractor.stft.conv_real.weight": torch.randn(513, 1, 1024),
        "audio_branch.logmel_extractor.melW": torch.randn(513, 64),
        "audio_branch.tscam_conv.weight": torch.randn(527, 128, 2, 3),
        "audio_branch.head.weight": torch.randn(527, 527),
        "audio_branch.layers.0.blocks.1.attn_mask": torch.zeros(64, 64, 64),
        "text_transform.sequential.0.weight": torch.randn(24, 24),
        "audio_transform.sequential.3.bias": torch.randn(24),
        "text_branch.embeddings.position_ids": torch.arange(82)[None],
    }
    out.update({"module." + k: v for k, v in extra.items()})
    return out


@pytest.fixture(scope="module")
def laion_pt(tiny_fused, tmp_path_factory):
    """An original-format fused checkpoint and a transformers reference with the original text eps (1e-5)."""
    from tiny_models import hf_clap

    directory, _, tokenizer, extractor = tiny_fused
    ref = hf_clap(True, vocab_size=len(tokenizer), seed=7)
    for module in ref.text_model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    path = tmp_path_factory.mktemp("laion") / "630k-audioset-fusion-best.pt"
    torch.save({"epoch": 45, "name": "tiny", "state_dict": laion_state_dict(ref),
                "optimizer": {"state": {}, "param_groups": []}}, path)
    return path, ref, tokenizer, extractor, directory


def test_laion_pt_loads_with_inferred_architecture_and_matches_reference(laion_pt):
    path, ref, tokenizer, extractor, tok_dir = laion_pt
    m = load_model(path, device="cpu", precision="fp32", tokenizer=str(tok_dir))
    assert m.fused and m.config.audio.depths == [2, 2, 2, 1] and m.config.audio.num_attention_heads == [1, 2, 2, 4]
    assert m.config.audio.patch_embeds_hidden_size == 16 and m.config.text.num_hidden_layers == 2

    waves = [tone_noise(3.0, SR, seed=1), tone_noise(14.0, SR, seed=2)]
    np.random.seed(0)
    feats = extractor(waves, sampling_rate=SR, return_tensors="pt")
    crops = replay_hf_fusion_crops([len(w) for w in waves], seed=0)
    with torch.no_grad():
        a_ref = ref.get_audio_features(input_features=feats["input_features"],
                                       is_longer=torch.tensor([[False], [True]])).pooler_output.numpy()
        tok = tokenizer(["a siren", "birds in the morning"], padding=True, return_tensors="pt")
        t_ref = ref.get_text_features(**tok).pooler_output.numpy()
    a = np.stack([e.embedding for e in m.embed_waveforms(waves, segments=False, crop_starts=crops)])
    t = m.embed_text(["a siren", "birds in the morning"])
    a_ref /= np.linalg.norm(a_ref, axis=1, keepdims=True)
    t_ref /= np.linalg.norm(t_ref, axis=1, keepdims=True)
    assert (a * a_ref).sum(1).min() >= 0.9999
    assert (t * t_ref).sum(1).min() >= 0.9999


def test_malicious_pickle_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(path, device="cpu")
    assert not marker.exists()


def test_strict_load_reports_readable_key_and_shape_diff(tiny_fused, tmp_path):
    from safetensors.torch import load_file, save_file

    directory = tiny_fused[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in directory.iterdir():
        if f.name != "model.safetensors":
            (bad / f.name).write_bytes(f.read_bytes())
    state = load_file(directory / "model.safetensors")
    del state["audio_projection.linear2.bias"]
    state["text_projection.linear1.weight"] = torch.zeros(3, 3)
    state["something.else"] = torch.zeros(1)
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(bad, device="cpu")
    msg = str(info.value)
    assert "1 missing from the checkpoint" in msg and "audio_projection.linear2.bias" in msg
    assert "not used by the model" in msg and "something.else" in msg
    assert "text_projection.linear1.weight: checkpoint (3, 3) vs model (24, 128)" in msg


def test_own_format_round_trip(tiny_unfused, tmp_path):
    m = load_model(tiny_unfused[0], device="cpu")
    saved = m.save(tmp_path / "mine")
    again = load_model(saved, device="cpu")
    wave = [tone_noise(2.0, SR, seed=9)]
    assert np.allclose(m.embed_waveforms(wave)[0].embedding, again.embed_waveforms(wave)[0].embedding, atol=1e-6)
    assert np.allclose(m.embed_text(["rain"]), again.embed_text(["rain"]), atol=1e-6)
    assert again.loaded.kind == "clapcli" and not again.fused


def test_unknown_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(str(tmp_path / "nope.pt"), device="cpu")


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_missing_weights_without_network_is_one_line_error(tmp_path, env):
    environ = dict(os.environ, HF_HOME=str(tmp_path / "hf"), **env)
    proc = subprocess.run([sys.executable, "-m", "clapcli", "embed", "--text", "hello"],
                          capture_output=True, text=True, env=environ, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "clap models pull laion/clap-htsat-fused" in lines[0] and "--model PATH" in lines[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name,audio", [
    ("htsat-tiny-fused", dict(enable_fusion=True)),
    ("htsat-base", dict(patch_embeds_hidden_size=128, depths=[2, 2, 12, 2], hidden_size=1024)),
])
def test_presets_have_the_released_architectures(name, audio):
    """Our presets hold exactly the tensors of the hub's configs (clap-htsat-fused, larger_clap_*)."""
    from transformers import ClapConfig, ClapModel

    from clapcli.models.weights import DERIVED_KEY
    from clapcli.models.clap import ClapModel as Ours
    from clapcli.models.presets import preset

    with torch.device("meta"):
        ref = ClapModel(ClapConfig(audio_config=audio)).state_dict()
        ours = Ours(preset(name)).state_dict()
    shapes = lambda sd: {k: tuple(v.shape) for k, v in sd.items() if not DERIVED_KEY.search(k)}  # noqa: E731
    assert shapes(ours) == shapes(ref)


def test_a_save_that_dies_midway_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    """The weights are written beside the old file and renamed into place: a save killed halfway (disk full,
    Ctrl-C) leaves the previous model whole, and a process with the old file memory-mapped keeps its pages."""
    import safetensors.torch

    from clapcli.models.checkpoints import load_checkpoint, save_own
    from clapcli.models.clap import ClapModel
    from clapcli.models.presets import preset
    from tiny_models import train_tokenizer

    tokenizer = train_tokenizer()
    cfg = preset("tiny")
    cfg.text.vocab_size = len(tokenizer)
    model = ClapModel(cfg)
    save_own(model, tokenizer, tmp_path / "m")
    loaded = load_checkpoint(tmp_path / "m").model
    snapshot = {k: v.clone() for k, v in loaded.state_dict().items()}

    def dies_midway(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(OSError):
        save_own(model, tokenizer, tmp_path / "m")
    monkeypatch.undo()
    again = load_checkpoint(tmp_path / "m").model
    assert all(torch.equal(v, snapshot[k]) for k, v in again.state_dict().items())
    assert all(torch.equal(v, snapshot[k]) for k, v in loaded.state_dict().items())
    assert [p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")] == []
