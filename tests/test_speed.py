"""Start-up and query speed, asserted through what a process imports and computes (timings are not asserted:
this machine is shared; benchmarks/RESULTS.md has the measurements).

- `clap --help` and shell completion import neither torch nor transformers;
- a cold text search without a saved query graph (test_onnx.py covers the graph, which needs no torch)
  loads the text half of the checkpoint (test_text_towers.py: only its tensors are read), which equals the
  whole model and transformers;
- weights are memory-mapped into the model (no random init, no second copy);
- `clap search --stdin` answers line after line from one process, with an in-process embedding cache;
- a query by an indexed, unchanged file takes its stored vector: no model, no torch, no audio decoding.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clapcli import load_model
from entry_point import clap_executable

TEXTS = ["a dog barking in the distance", "rain falling on a tin roof", "piano chords and soft drums"]
FILES = ["dog.wav", "rain.wav", "piano.wav"]


def run_python(args, stdin: str | None = None) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime ARGS`; returns the process and the set of modules it imported."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.run([sys.executable, "-X", "importtime", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and line.count("|") == 2}
    return proc, modules


@pytest.fixture(scope="module")
def text_index(tiny_model_dir, tmp_path_factory):
    """An index whose three files are the embeddings of TEXTS, under the tiny model's identity."""
    from clapcli.index.store import IndexStore

    model = load_model(tiny_model_dir, device="cpu", precision="fp32")
    index_dir = tmp_path_factory.mktemp("speed") / "idx"
    with IndexStore.open(index_dir, create=True) as store:
        store.set_model_identity(model.identity_dict)
        store.record_precision("fp32")
        for name, vector in zip(FILES, model.embed_text(TEXTS)):
            store.upsert_file(f"/lib/{name}", 1, 1, name, 5.0, 48_000, 1, [(0.0, 5.0, "file", vector)])
    return index_dir


def test_help_and_completion_import_neither_torch_nor_transformers():
    proc, modules = run_python(["-m", "clapcli", "--help"])
    assert proc.returncode == 0 and "search" in proc.stdout
    assert "typer" in modules and "clapcli.cli.search" in modules
    assert not {"torch", "transformers", "numpy"} & modules

    os.environ.update(_CLAP_COMPLETE="complete_bash", COMP_WORDS="clap search --pre", COMP_CWORD="2")
    try:
        proc, modules = run_python([clap_executable()])
    finally:
        for key in ("_CLAP_COMPLETE", "COMP_WORDS", "COMP_CWORD"):
            os.environ.pop(key)
    assert "--precision" in proc.stdout.split()
    assert "clapcli.cli.main" in modules and not {"torch", "transformers"} & modules


def test_cold_text_search_without_a_saved_graph_runs_the_text_half_in_torch(text_index, tiny_model_dir):
    proc, modules = run_python(["-m", "clapcli", "search", TEXTS[1], "--index", text_index,
                                "--model", tiny_model_dir, "--json", "-k", "2"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = [json.loads(line) for line in proc.stdout.splitlines()]
    assert hits[0]["path"] == "/lib/rain.wav" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert "torch" in modules and "torchaudio" not in modules  # (transformers imports soundfile itself)


def test_text_only_model_equals_the_whole_model_and_transformers(tiny_fused):
    from clapcli.errors import ClapError

    directory, hf_model, hf_tokenizer, _ = tiny_fused
    texts = [*TEXTS, "glass " + "very " * 120 + "loud", "", "naïve café — 東京"]  # truncated at 77, empty, unicode
    lean = load_model(directory, device="cpu", precision="fp32", text_only=True)
    whole = load_model(directory, device="cpu", precision="fp32")
    assert lean.text_only and type(lean.model).__name__ == "ClapTextModel" and not whole.text_only
    for mine, theirs in ((lean.tokenizer, whole.tokenizer), (lean.tokenizer, hf_tokenizer)):
        a = mine(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        b = theirs(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    got = lean.embed_text(texts)
    np.testing.assert_allclose(got, whole.embed_text(texts), atol=1e-5)
    tok = hf_tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = hf_model.get_text_features(**tok)
    ref = torch.nn.functional.normalize(getattr(ref, "pooler_output", ref), dim=-1).numpy()
    assert (got * ref).sum(-1).min() >= 0.9999
    assert lean.identity_dict == whole.identity_dict
    with pytest.raises(ClapError, match="text only"):
        lean.embed_audio(np.zeros(48_000, np.float32))


def test_text_only_serves_any_text_tower_of_a_model_directory(tiny_model_dir, tmp_path):
    """The text half is built by transformers, so a tower outside RoBERTa/BERT's exact maths (here the
    gelu_new activation) loads text-only too, with the whole model's embeddings."""
    other = tmp_path / "gelu-new"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["hidden_act"] = "gelu_new"
    (other / "config.json").write_text(json.dumps(config))
    lean = load_model(other, device="cpu", precision="fp32", text_only=True)
    assert lean.text_only
    np.testing.assert_allclose(lean.embed_text(TEXTS), load_model(other, device="cpu", precision="fp32")
                               .embed_text(TEXTS), atol=1e-5)


def test_text_only_serves_models_in_the_own_format(tiny_model_dir, tmp_path):
    """What `clap train` and `Clap.save` write (config.json with every ClapConfig field) takes the text-only
    path too, with the whole model's embeddings."""
    whole = load_model(tiny_model_dir, device="cpu", precision="fp32")
    whole.save(tmp_path / "own")
    lean = load_model(tmp_path / "own", device="cpu", precision="fp32", text_only=True)
    assert lean.text_only
    texts = ["a dog barking", "rain on a roof"]
    np.testing.assert_allclose(lean.embed_text(texts), whole.embed_text(texts), atol=1e-5)


def test_weights_are_memory_mapped_into_the_model_without_a_random_init(tiny_model_dir, monkeypatch):
    """The parameters live in the checkpoint's file mapping (no second copy), and no torch.nn.init function
    runs while the model is built (they would fail here)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux)")

    def refuse(*args, **kwargs):
        raise AssertionError("a random initialisation ran")

    for name in ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    weights = os.path.realpath(Path(tiny_model_dir) / "model.safetensors")
    for text_only in (True, False):
        m = load_model(tiny_model_dir, device="cpu", precision="fp32", text_only=text_only)
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-"))
                  for line in maps.read_text().splitlines() if line.endswith(weights)]
        for param in (m.model.text_projection.linear1.weight, m.model.logit_scale_a):
            assert any(lo <= param.data_ptr() < hi for lo, hi in ranges), "a parameter was copied out of the file"
        assert not any(p.is_meta for p in m.model.parameters())
    assert torch.nn.init.normal_ is refuse  # restored after the build


def test_embed_text_cache_embeds_each_text_once(tiny_model_dir):
    m = load_model(tiny_model_dir, device="cpu", precision="fp32", text_only=True)
    calls = []
    embed = m._embed_text
    m._embed_text = lambda texts, batch_size=64: calls.append(list(texts)) or embed(texts, batch_size)
    first = m.embed_text(TEXTS[:2], cache=True)
    again = m.embed_text([TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2]], cache=True)
    assert calls == [TEXTS[:2], [TEXTS[2]]]
    np.testing.assert_array_equal(again[[2, 0]], first)
    np.testing.assert_allclose(again, embed([TEXTS[1], TEXTS[2], TEXTS[0], TEXTS[2]]), atol=1e-6)


def test_stdin_answers_one_query_per_line_from_one_process(text_index, tiny_model_dir):
    lines = [TEXTS[1], json.dumps({"query": TEXTS[0], "k": 1}), "", json.dumps({"query": 5}), TEXTS[1],
             json.dumps({"query": TEXTS[2], "k": 0})]
    proc, _ = run_python(["-m", "clapcli", "search", "--stdin", "--index", text_index, "--model", tiny_model_dir,
                          "--json", "-k", "2"], stdin="\n".join(lines) + "\n")
    assert proc.returncode == 1, proc.stderr[-2000:]  # two lines were refused, the others answered
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o.get("query") for o in out] == [TEXTS[1], TEXTS[0], None, TEXTS[1], None]
    assert [len(o.get("results", [])) for o in out] == [2, 1, 0, 2, 0] and out[0]["k"] == 2 and out[1]["k"] == 1
    assert out[0]["results"][0]["path"] == "/lib/rain.wav" and out[1]["results"][0]["path"] == "/lib/dog.wav"
    assert out[3] == out[0]  # the repeated query, from the cache, gives the same answer
    assert out[2]["line"] == 4 and "query" in out[2]["error"] and out[4]["line"] == 6 and '"k"' in out[4]["error"]
    assert "error: line 4" in proc.stderr


def test_stdin_refuses_a_query_on_the_command_line_too(text_index, tiny_model_dir):
    from cli_runner import clap
    from clapcli.errors import UsageError

    result = clap("search", "rain", "--stdin", "--index", text_index, "--model", tiny_model_dir, ok=False)
    assert isinstance(result.exception, UsageError) and "--stdin reads the queries" in str(result.exception)


def test_searcher_sees_a_commit_made_after_it_was_opened(tmp_path):
    from clapcli.index.search import Searcher
    from clapcli.index.store import IndexStore

    a, b = np.eye(2, dtype=np.float32)
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        store.set_model_identity({"model": "fake", "dim": 2})
        store.upsert_file("/lib/a.wav", 1, 1, "a", 1.0, 48_000, 1, [(0.0, 1.0, "file", a)])
        searcher = Searcher(store)
        assert [h.path for h in searcher.search(b, k=5)] == ["/lib/a.wav"]
        store.upsert_file("/lib/b.wav", 1, 1, "b", 1.0, 48_000, 1, [(0.0, 1.0, "file", b)])
        assert [h.path for h in searcher.search(b, k=5)] == ["/lib/b.wav", "/lib/a.wav"]


def test_embed_text_cache_keeps_the_most_recent_texts(tiny_model_dir, monkeypatch):
    from clapcli.engine import clap as engine_clap

    monkeypatch.setattr(engine_clap, "TEXT_CACHE_SIZE", 2)
    m = load_model(tiny_model_dir, device="cpu", precision="fp32", text_only=True)
    m.embed_text(TEXTS, cache=True)
    assert list(m._text_cache) == TEXTS[1:]  # the oldest left
    m.embed_text([TEXTS[1]], cache=True)
    assert list(m._text_cache) == [TEXTS[2], TEXTS[1]]  # a hit becomes the most recent


def test_query_by_an_indexed_file_uses_its_stored_vector_and_imports_no_torch(tiny_model_dir, tmp_path):
    """`clap search --audio FILE` for a file in the index, unchanged since: no model, no audio decoding; the
    ranking is the one embedding the same sound gives (a copy outside the index)."""
    from audio_synth import tone_noise, write_audio
    from cli_runner import clap

    lib = tmp_path / "lib"
    lib.mkdir()
    for seed, name in enumerate(FILES):
        write_audio(lib / name, tone_noise(1.5 + seed, 48_000, seed=seed), 48_000)
    clap("index", lib, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--workers", "0")
    example = (lib / FILES[1]).resolve()
    proc, modules = run_python(["-m", "clapcli", "search", "--audio", example, "--index", tmp_path / "idx", "--json",
                                "--include-self"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not {"torch", "transformers", "onnxruntime", "soundfile", "clapcli.audio.decode"} & modules
    stored = [json.loads(line) for line in proc.stdout.splitlines()]
    copy = tmp_path / "copy.wav"
    shutil.copyfile(example, copy)
    embedded = [json.loads(line) for line in clap("search", "--audio", copy, "--index", tmp_path / "idx",
                                                  "--json").stdout.splitlines()]
    assert stored[0]["path"] == str(example) and [h["path"] for h in stored] == [h["path"] for h in embedded]
    assert [h["score"] for h in stored] == pytest.approx([h["score"] for h in embedded], abs=1e-4)
