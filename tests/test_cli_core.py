"""The model-core commands and behaviours: `clap --help`, `clap embed`, `clap models`, hub cache, towers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from audio_synth import tone_noise, write_audio
from clapcli import load_model
from clapcli.cli.main import app

runner = CliRunner()


CORE_COMMANDS = {"embed", "index", "search", "tag", "models"}


def test_help_lists_the_registered_commands_without_importing_torch():
    import typer.main

    registered = set(typer.main.get_command(app).commands)  # the click commands of the real app
    assert CORE_COMMANDS <= registered, f"not registered: {sorted(CORE_COMMANDS - registered)}"
    code = ("import sys; from clapcli.cli.main import app; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    out = subprocess.run([sys.executable, "-m", "clapcli", "--help"], capture_output=True, text=True,
                         check=True, timeout=60, env=dict(os.environ, COLUMNS="120")).stdout
    # The names heading the rows of the "Commands" panel ("│ name   help… │"; wrapped help lines are
    # indented), not any word of the app's description.
    panel = out[out.index("─ Commands ─"):].splitlines()[1:]
    listed = {m.group(1) for m in map(re.compile(r"│ (\S+)").match, panel) if m}
    assert listed == registered


@pytest.fixture()
def clips(tmp_path):
    a = write_audio(tmp_path / "a.wav", tone_noise(1.5, 44_100, channels=2, seed=1), 44_100, subtype="PCM_16")
    b = write_audio(tmp_path / "b.flac", tone_noise(14.0, 22_050, seed=2), 22_050)
    bad = tmp_path / "bad.wav"
    bad.write_text("no")
    return a, b, str(bad)


def test_embed_json_and_npy_match_the_api(tiny_model_dir, clips, tmp_path):
    a, b, _ = clips
    res = runner.invoke(app, ["embed", a, b, "--text", "a dog", "--model", str(tiny_model_dir), "--json",
                              "--segments"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["type"] for r in rows] == ["audio", "audio", "text"]
    assert rows[1]["duration"] == pytest.approx(14.0) and len(rows[1]["segments"]) == 2
    assert rows[1]["segments"][-1]["end"] == pytest.approx(14.0)
    out = tmp_path / "e.npy"
    res = runner.invoke(app, ["embed", a, b, "--text", "a dog", "--model", str(tiny_model_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    arr = np.load(out)
    m = load_model(tiny_model_dir, device="cpu")
    expected = np.concatenate([m.embed_audio([a, b]), m.embed_text(["a dog"])])
    assert arr.shape == (3, m.dim) and np.allclose(arr, expected, atol=1e-5)
    assert np.allclose(arr, np.array([r["embedding"] for r in rows]), atol=1e-6)


def test_embed_reports_a_bad_file_and_exits_1(tiny_model_dir, clips):
    a, _, bad = clips
    res = runner.invoke(app, ["embed", a, bad, "--model", str(tiny_model_dir), "--json"])
    assert res.exit_code == 1
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert "embedding" in rows[0] and rows[1]["error"].startswith("not a recognised audio file")
    assert f"{bad}: not a recognised audio file" in " ".join(res.stderr.split())  # stderr names the file


def test_embed_arrays_resample_and_downmix(tiny_model_dir):
    m = load_model(tiny_model_dir, device="cpu")
    stereo = tone_noise(2.0, 44_100, channels=2, seed=3)
    from clapcli.audio.decode import to_model_rate

    direct = m.embed_waveforms([to_model_rate(stereo, 44_100)], segments=False)[0].embedding
    assert np.allclose(m.embed_audio([stereo], sample_rate=44_100)[0], direct, atol=1e-6)


def test_models_list_json_and_offline_pull(tmp_path):
    res = runner.invoke(app, ["models", "list", "--json"])
    assert res.exit_code == 0
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    names = {r["name"] for r in rows}
    assert {"laion/clap-htsat-fused", "laion/clap-htsat-unfused", "laion/larger_clap_general",
            "630k-audioset-fusion-best"} <= names
    default = next(r for r in rows if r["default"])
    assert default["name"] == "laion/clap-htsat-fused" and default["fused"] and default["dim"] == 512
    assert set(rows[0]) >= {"name", "architecture", "fused", "dim", "cached"}
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "clapcli", "models", "pull", "laion/clap-htsat-unfused"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "clap models pull" in proc.stderr


def test_hub_id_loads_from_the_standard_hugging_face_cache(tiny_fused, tmp_path, monkeypatch):
    """A hub id resolves through HF_HOME's snapshot layout, offline, and shows as cached."""
    directory = tiny_fused[0]
    repo = tmp_path / "hf" / "hub" / "models--laion--clap-htsat-fused"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(directory, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    m = load_model(None, device="cpu")  # the default model
    assert m.fused and m.loaded.kind == "huggingface"
    direct = load_model(directory, device="cpu")
    wave = [tone_noise(3.0, 48_000, seed=4)]
    assert np.allclose(m.embed_waveforms(wave)[0].embedding, direct.embed_waveforms(wave)[0].embedding)
    from clapcli.models.registry import is_cached

    assert is_cached("laion/clap-htsat-fused") and not is_cached("laion/clap-htsat-unfused")


@pytest.mark.parametrize("tower", ["bert", "clip_text_model"])
def test_other_text_towers_round_trip_in_our_format(tower, tiny_fused, tmp_path):
    """BERT and CLIP text towers: built from a config, saved in our format, loaded and used."""
    import torch
    from transformers import PreTrainedTokenizerFast

    from clapcli.models.checkpoints import save_own
    from clapcli.models.clap import ClapModel
    from clapcli.models.config import AudioConfig, ClapConfig, TextConfig

    tokenizer = tiny_fused[2]
    text = TextConfig(model_type=tower, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=80,
                      layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cfg = ClapConfig(audio=AudioConfig(patch_embeds_hidden_size=16, depths=[1, 1, 1, 1],
                                       num_attention_heads=[1, 1, 2, 2], hidden_size=128),
                     text=text, projection_dim=16)
    torch.manual_seed(0)
    model = ClapModel(cfg).eval()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    save_own(model, tokenizer, tmp_path / "m")
    m = load_model(tmp_path / "m", device="cpu")
    emb = m.embed_text(["a dog barking", "rain"])
    assert emb.shape == (2, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])
    tok = tokenizer(["a dog barking"], return_tensors="pt")
    with torch.no_grad():
        ref = model.encode_text(tok["input_ids"], tok["attention_mask"]).numpy()
    assert np.allclose(emb[0], ref[0], atol=1e-5)


def test_embed_out_keeps_rows_aligned_with_a_nan_row_for_a_bad_file(tiny_model_dir, clips, tmp_path):
    a, b, bad = clips
    out = tmp_path / "e.npy"
    res = runner.invoke(app, ["embed", a, bad, b, "--model", str(tiny_model_dir), "--out", str(out)])
    assert res.exit_code == 1
    arr = np.load(out)
    assert arr.shape[0] == 3 and np.isnan(arr[1]).all() and not np.isnan(arr[[0, 2]]).any()
    res = runner.invoke(app, ["embed", a, "--model", str(tiny_model_dir), "--out", str(tmp_path / "no" / "e.npy")])
    assert res.exit_code != 0 and "no such directory" in str(res.exception)


def test_a_failing_forward_pass_costs_only_its_own_file(tiny_model_dir, clips, monkeypatch):
    """A batch that fails (say, out of memory on one huge file) is retried file by file."""
    a, b, _ = clips
    m = load_model(tiny_model_dir, device="cpu")
    real = m._run_jobs

    def fails_on_long(jobs, *args, **kw):  # the long file's fusion stack is the one job that is not a waveform
        if any(not isinstance(j[2], np.ndarray) for j in jobs):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(jobs, *args, **kw)

    monkeypatch.setattr(m, "_run_jobs", fails_on_long)
    results = list(m.embed_files([a, b, a]))
    assert [r.error is None for r in results] == [True, False, True]
    assert "out of memory" in results[1].error and results[0].embedding is not None
