"""The onnxruntime engine (`--engine onnx`, chosen by `auto` where it can run): the HTSAT audio encoder exported
once to ONNX, cached, and run by onnxruntime, at fp32 (equal to torch to float rounding) and int8."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli import load_model
from clapcli.errors import ClapError
from clapcli.models import onnx_audio
from clapcli.models.onnx_audio import OnnxHTSAT, resolve_engine

CPU = torch.device("cpu")
# Short (global path only) and long (fused: AFF over three local crops) clips in one batch: the exported
# graph must pick the fused patch map for exactly the clips marked is_longer.
SECONDS = [0.7, 4.0, 10.0, 14.0, 23.0, 31.0]


def waves():
    return [tone_noise(s, 48_000, seed=i) for i, s in enumerate(SECONDS)]


def embed(m, segments=True):
    out = m.embed_waveforms(waves(), segments=segments, batch_size=4)
    files = np.stack([e.embedding for e in out])
    windows = np.stack([s.embedding for e in out for s in e.segments]) if segments else None
    return files, windows


@pytest.fixture(scope="module")
def torch_fp32(tiny_model_dir):
    return load_model(tiny_model_dir, device="cpu", precision="fp32", engine="torch")


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_unfused_dir"])
def test_onnx_fp32_equals_torch_for_fused_and_unfused_models(fixture, request):
    directory = request.getfixturevalue(fixture)
    ref = load_model(directory, device="cpu", precision="fp32", engine="torch")
    fast = load_model(directory, device="cpu", precision="fp32", engine="onnx")
    assert (ref.engine, fast.engine) == ("torch", "onnx")
    a_files, a_windows = embed(ref)
    b_files, b_windows = embed(fast)
    assert np.abs(a_files - b_files).max() < 1e-5 and np.abs(a_windows - b_windows).max() < 1e-5
    assert (a_files * b_files).sum(-1).min() > 0.99999
    runner = fast.model.audio_runner
    assert set(runner._sessions) == ({"global", "fused"} if runner.fused else {"global"})  # onnxruntime ran


def test_the_fused_graph_applies_aff_only_to_clips_marked_longer(tiny_model_dir, torch_fp32):
    fast = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    feats = torch.randn(4, 4, 1001, 64)
    for flags in ([True, False, True, False], [False] * 4, [True] * 4):
        longer = torch.tensor(flags)
        with torch.inference_mode():
            want = torch_fp32.model.audio_model.audio_encoder(feats, longer)
            got = fast.model.audio_runner(feats, longer)
        assert torch.allclose(got, want, atol=1e-5), flags
    with torch.inference_mode():  # and the flag changes the result (AFF is not a no-op on these weights)
        a = fast.model.audio_runner(feats, torch.tensor([True] * 4))
        b = fast.model.audio_runner(feats, torch.tensor([False] * 4))
    assert not torch.allclose(a, b, atol=1e-3)


def test_onnx_int8_stays_within_cosine_0995_of_fp32_and_differs_from_it(tiny_model_dir, torch_fp32):
    fast = load_model(tiny_model_dir, device="cpu", precision="int8", engine="onnx")
    a, _ = embed(torch_fp32, segments=False)
    b, _ = embed(fast, segments=False)
    cos = (a * b).sum(-1)
    assert cos.min() >= 0.995, cos
    assert not np.allclose(a, b, atol=1e-6)
    names = sorted(p.name.split("-", 2)[2] for p in fast.model.audio_runner.path().parent.iterdir())
    assert names == ["fused-int8.onnx"]  # the fp32 export it was quantised from is gone; no windows here
    text = ["a dog barking", "rain"]  # the text tower is torch's dynamic int8
    assert (torch_fp32.embed_text(text) * fast.embed_text(text)).sum(-1).min() >= 0.995


def test_the_export_is_cached_per_weights_and_reused(tiny_model_dir, tiny_unfused_dir, monkeypatch, clap_home):
    first = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    embed(first, segments=False)
    path = first.model.audio_runner.path("fused")
    assert path.is_file() and path.is_relative_to(clap_home)
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(OnnxHTSAT, "_export", lambda self, graph, p: pytest.fail("exported again"))
    second = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    embed(second, segments=False)
    assert second.model.audio_runner.path("fused") == path and path.stat().st_mtime_ns == stamp
    other = load_model(tiny_unfused_dir, device="cpu", precision="fp32", engine="onnx")
    assert other.model.audio_runner.path() != path  # other weights, other file
    assert not list(path.parent.glob("*.tmp"))


def test_auto_picks_onnx_where_it_can_run_and_torch_elsewhere(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("CLAP_ENGINE")
    htsat = load_model(tiny_model_dir, device="cpu", precision="fp32").model.audio_model.audio_encoder
    assert resolve_engine(None, CPU, htsat, "int8") == "onnx"
    assert resolve_engine("auto", CPU, htsat, "int8") == "onnx"
    assert resolve_engine("auto", CPU, htsat, "fp32") == "torch"  # exact fp32: torch unless asked
    assert resolve_engine("onnx", CPU, htsat, "fp32") == "onnx"
    assert resolve_engine("auto", torch.device("cuda"), htsat, "int8") == "torch"
    assert resolve_engine("auto", CPU, htsat, "bf16") == "torch"
    assert resolve_engine("auto", CPU, None, "int8") == "torch"  # text only: no audio tower
    assert resolve_engine("auto", CPU, torch.nn.Linear(2, 2), "int8") == "torch"  # PANN, Wav2CLIP: torch
    monkeypatch.setenv("CLAP_ENGINE", "torch")
    assert resolve_engine(None, CPU, htsat, "int8") == "torch"
    monkeypatch.setattr(onnx_audio, "onnxruntime_available", lambda: False)
    assert resolve_engine("auto", CPU, htsat, "int8") == "torch"
    with pytest.raises(ClapError, match=r"onnxruntime is not installed: pip install onnxruntime onnx"):
        resolve_engine("onnx", CPU, htsat, "fp32")


def test_onnx_by_name_where_it_cannot_run_is_a_one_line_error(tiny_model_dir):
    htsat = load_model(tiny_model_dir, device="cpu", precision="fp32").model.audio_model.audio_encoder
    with pytest.raises(ClapError, match="runs HTSAT audio encoders only"):
        resolve_engine("onnx", CPU, torch.nn.Linear(2, 2), "fp32")
    with pytest.raises(ClapError, match="on the CPU only"):
        resolve_engine("onnx", torch.device("cuda"), htsat, "fp32")
    with pytest.raises(ClapError, match="unknown engine 'tpu'"):
        resolve_engine("tpu", CPU, htsat, "fp32")


def test_training_mode_and_gradients_never_use_the_exported_copy(tiny_model_dir):
    m = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    calls = []
    m.model.audio_runner = lambda *a: calls.append(1) or pytest.fail("runner used with gradients")
    feats, longer = torch.randn(2, 4, 1001, 64), torch.tensor([True, False])
    m.model.train()
    m.model.encode_audio(feats, longer).sum().backward()
    m.model.eval()
    with torch.enable_grad():
        m.model.encode_audio(feats, longer)
    assert calls == []


def test_text_only_and_training_embedders_stay_on_torch(tiny_model_dir, monkeypatch):
    from clapcli.train.validation import embedder

    monkeypatch.delenv("CLAP_ENGINE")
    assert load_model(tiny_model_dir, device="cpu", text_only=True, precision="int8").engine == "torch"
    m = load_model(tiny_model_dir, device="cpu", precision="int8")
    assert m.engine == "onnx"
    assert embedder(m.model, m.tokenizer, CPU).engine == "torch"  # weights change every step


def test_cli_engine_option_and_auto_default(tiny_model_dir, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i, s in enumerate([3.0, 17.0]):
        write_audio(lib / f"f{i}.wav", tone_noise(s, 44_100, seed=i), 44_100)
    vectors = {}
    for engine in ("torch", "onnx"):
        out = tmp_path / f"{engine}.npy"
        clap("embed", lib / "f1.wav", "--model", tiny_model_dir, "--engine", engine, "--out", out)
        vectors[engine] = np.load(out)
    assert np.abs(vectors["torch"] - vectors["onnx"]).max() < 1e-5
    monkeypatch.delenv("CLAP_ENGINE")  # the default a user gets: auto → onnx for int8 here
    r = clap("index", lib, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--precision", "int8", "--json")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["added"] == 2 and summary["total_errors"] == 0
    assert list((tmp_path / "clap-home" / "onnx").glob("htsat-*-fused-int8.onnx"))  # ran in onnxruntime
    bad = clap("embed", lib / "f0.wav", "--model", tiny_model_dir, "--engine", "tpu", ok=False)
    assert bad.exit_code != 0 and "unknown engine 'tpu'" in str(bad.exception)


# ---- the torch-free text query (clapcli.models.onnx_text) ----------------------------------------------------

QUERIES = ["a dog barking", "rain on a tin roof", "x", "a very long query " * 30]


@pytest.mark.parametrize("text_only", [False, True])
def test_a_saved_text_query_graph_embeds_like_the_model(tiny_model_dir, text_only):
    from clapcli.models.onnx_text import load_text_query, save_text_query

    ref = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="torch", text_only=text_only)
    assert load_text_query(str(tiny_model_dir)) is None  # nothing saved yet
    assert save_text_query(ref) is not None
    q = load_text_query(str(tiny_model_dir))
    assert q is not None and q.identity_dict == ref.identity_dict and q.fingerprint == ref.fingerprint
    want = ref.embed_text(QUERIES)
    assert np.abs(q.embed_text(QUERIES) - want).max() < 1e-5  # long one truncated at 77 tokens, as the model
    assert np.abs(q.embed_text(QUERIES[:2], cache=True) - want[:2]).max() < 1e-5
    assert np.array_equal(q.embed_text(QUERIES[:2], cache=True), q.embed_text(QUERIES[:2], cache=True))


def test_only_an_fp32_model_saves_the_text_query_graph(tiny_model_dir):
    from clapcli.models.onnx_text import save_text_query

    # clap index at int8 loads the text half again at fp32 for it (test_clap_index_saves_the_query_graph...)
    assert save_text_query(load_model(tiny_model_dir, device="cpu", precision="int8", engine="torch")) is None


def test_clap_index_saves_the_query_graph_and_a_text_search_then_runs_without_torch(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    import os
    import subprocess
    import sys

    lib = tmp_path / "lib"
    lib.mkdir()
    for i, s in enumerate([3.0, 6.0, 17.0]):
        write_audio(lib / f"f{i}.wav", tone_noise(s, 44_100, seed=i), 44_100)
    monkeypatch.delenv("CLAP_ENGINE")
    idx = tmp_path / "idx"
    clap("index", lib, "--index", idx, "--model", tiny_model_dir, "--precision", "int8", "--json")  # the fast way
    assert list((tmp_path / "clap-home" / "onnx").glob("text-*.onnx"))
    monkeypatch.setenv("CLAP_ENGINE", "torch")  # the model loaded in torch: the reference
    with_torch = clap("search", "a dog barking", "--index", idx, "--json").stdout
    script = ("import sys, runpy; sys.argv = ['clap', 'search', 'a dog barking', '--index', sys.argv[1], '--json'];"
              "code = 0\ntry:\n    runpy.run_module('clapcli', run_name='__main__')\nexcept SystemExit as e:\n"
              "    code = e.code or 0\nassert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)")
    env = {**os.environ, "CLAP_ENGINE": "auto"}
    run = subprocess.run([sys.executable, "-c", script, str(idx)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    a = [json.loads(line) for line in with_torch.splitlines()]
    b = [json.loads(line) for line in run.stdout.splitlines()]
    assert [h["path"] for h in a] == [h["path"] for h in b] and len(a) == 3
    assert max(abs(x["score"] - y["score"]) for x, y in zip(a, b)) < 1e-4


def test_a_damaged_query_graph_falls_back_and_is_saved_again(tiny_model_dir):
    from clapcli.models.onnx_text import load_text_query, save_text_query

    m = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="torch")
    graph = save_text_query(m)
    graph.write_bytes(b"not an onnx file")
    assert load_text_query(str(tiny_model_dir)) is None  # the search then loads the model
    assert save_text_query(m) == graph  # the entry was dropped, so the next clap index writes it again
    assert np.abs(load_text_query(str(tiny_model_dir)).embed_text(QUERIES) - m.embed_text(QUERIES)).max() < 1e-5


def test_the_query_graph_key_follows_the_tokenizer_and_configs(tiny_model_dir, tmp_path):
    import shutil

    from clapcli.models.onnx_text import load_text_query, save_text_query

    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    assert save_text_query(load_model(copy, device="cpu", precision="fp32", engine="torch")) is not None
    assert load_text_query(str(copy)) is not None
    tok = copy / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("{", '{"edited": true, ', 1))  # same weights, other tokenizer settings
    assert load_text_query(str(copy)) is None  # not the saved graph's: the search loads the model


def test_an_int8_export_quantises_from_a_file_of_its_own(tiny_model_dir, monkeypatch):
    """Two processes exporting int8 at once: neither may delete the fp32 file the other quantises from, so
    the fp32 intermediate is private (a temporary name) unless an fp32 export was already cached."""
    from clapcli.models import onnx_audio as oa

    runner = load_model(tiny_model_dir, device="cpu", precision="int8", engine="onnx").model.audio_runner
    real, seen = oa._quantize, []

    def spy(source, target):
        seen.append((source, source.is_file(), runner.path("global", "fp32").exists()))
        real(source, target)

    monkeypatch.setattr(oa, "_quantize", spy)
    assert runner.ensure_file("global").is_file()
    source, present, shared = seen[0]
    assert present and not shared and source != runner.path("global", "fp32")  # a private fp32 export ...
    assert not source.exists()  # ... removed after
    cached = runner.ensure_file("global", "fp32")  # with an fp32 export cached, int8 is made from it, kept
    runner.path("global").unlink()
    runner.ensure_file("global")
    assert seen[-1][0] == cached and cached.is_file()


def test_a_damaged_cached_audio_graph_is_exported_again(tiny_model_dir, torch_fp32):
    """A cached graph onnxruntime cannot read (a disk fault, a torn copy) is deleted and exported again, and the
    embeddings equal torch's, instead of every `clap index` failing on it."""
    first = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    embed(first, segments=False)
    runner = first.model.audio_runner
    for graph in ("global", "fused"):
        runner.path(graph).write_bytes(b"\0garbage, not an onnx graph\n" * 10)
    again = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    got, got_windows = embed(again)
    want, want_windows = embed(torch_fp32)
    assert np.abs(got - want).max() < 1e-5 and np.abs(got_windows - want_windows).max() < 1e-5
    assert set(again.model.audio_runner._sessions) == {"global", "fused"}  # onnxruntime ran, on new files
    assert all(runner.path(g).stat().st_size > 1000 for g in ("global", "fused"))


def test_a_damaged_int8_graph_and_its_fp32_source_are_made_again(tiny_model_dir):
    first = load_model(tiny_model_dir, device="cpu", precision="int8", engine="onnx")
    want, _ = embed(first, segments=False)
    runner = first.model.audio_runner
    runner.ensure_file("fused", "fp32")  # an fp32 export cached beside the int8 one
    runner.path("fused").write_bytes(b"garbage")
    runner.path("fused", "fp32").write_bytes(b"garbage too")
    again = load_model(tiny_model_dir, device="cpu", precision="int8", engine="onnx")
    got, _ = embed(again, segments=False)
    assert np.abs(got - want).max() < 1e-5  # the same int8 graph, quantised from a fresh export
    assert not runner.path("fused", "fp32").exists()  # the damaged fp32 file was dropped, not reused


def test_temporaries_left_by_a_killed_export_are_removed_when_stale(tiny_model_dir):
    import os
    import time

    m = load_model(tiny_model_dir, device="cpu", precision="fp32", engine="onnx")
    runner = m.model.audio_runner
    cache = runner.path().parent
    cache.mkdir(parents=True, exist_ok=True)
    stale = cache / f"{runner.path().name}.12345.0123abcd.tmp"  # a SIGKILLed export's temporary
    fresh = cache / f"{runner.path().name}.{os.getpid()}.89abcdef.tmp"  # an export running now
    other = cache / "notes.txt"
    for p in (stale, fresh, other):
        p.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(other, (hour_ago, hour_ago))
    embed(m, segments=False)
    assert (stale.exists(), fresh.exists(), other.exists()) == (False, True, True)
