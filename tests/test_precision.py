"""--precision int8 (dynamic int8 Linear layers on the CPU), the bf16-on-CPU warning, and what an index
records about the precision of its embeddings."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from audio_synth import tone_noise
from clapcli import load_model, runtime
from clapcli.errors import UsageError
from clapcli.runtime import SlowPrecisionWarning, resolve_precision

CPU = torch.device("cpu")
TEXTS = ["a dog barking in the distance", "rain falling on a tin roof", "piano chords", "x"]


@pytest.fixture(scope="module")
def fp32_and_int8(tiny_model_dir):
    return (load_model(tiny_model_dir, device="cpu", precision="fp32"),
            load_model(tiny_model_dir, device="cpu", precision="int8"))


def is_quantized(model: nn.Module) -> bool:
    """True when some layer of `model` is a dynamically quantised int8 Linear."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return any(isinstance(m, DynamicQuantizedLinear) for m in model.modules())


def test_int8_quantises_every_linear_layer_of_both_towers(fp32_and_int8):
    exact, fast = fp32_and_int8
    assert fast.precision == "int8" and not is_quantized(exact.model) and is_quantized(fast.model)
    plain = [name for name, m in fast.model.named_modules() if type(m) is nn.Linear]
    assert plain == []  # every nn.Linear became a DynamicQuantizedLinear
    quantized = {name.split(".")[0] for name, m in fast.model.named_modules()
                 if type(m).__name__ == "Linear" and type(m) is not nn.Linear}
    assert {"audio_model", "text_model", "audio_projection", "text_projection"} <= quantized
    assert sum(type(m) is nn.Linear for m in exact.model.modules()) > 10  # fp32 left as it was


def test_int8_embeddings_stay_within_cosine_0995_of_fp32(fp32_and_int8):
    exact, fast = fp32_and_int8
    text_cos = (exact.embed_text(TEXTS) * fast.embed_text(TEXTS)).sum(-1)
    waves = [tone_noise(s, 48_000, seed=i) for i, s in enumerate([0.5, 4.0, 10.0, 23.0])]
    a = np.stack([e.embedding for e in exact.embed_waveforms(waves, segments=False)])
    b = np.stack([e.embedding for e in fast.embed_waveforms(waves, segments=False)])
    audio_cos = (a * b).sum(-1)
    assert text_cos.min() >= 0.995 and audio_cos.min() >= 0.995, (text_cos, audio_cos)
    assert not np.array_equal(a, b)  # int8 really computed something else


def test_int8_and_fp32_are_the_same_model_for_an_index(fp32_and_int8):
    exact, fast = fp32_and_int8
    assert fast.identity_dict == exact.identity_dict and fast.fingerprint == exact.fingerprint


def test_int8_is_refused_on_cuda_and_never_chosen_by_auto(monkeypatch):
    with pytest.raises(UsageError, match="int8 runs on the CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512_vnni", "amx_int8"})
    assert resolve_precision("auto", CPU) == "fp32" and resolve_precision("int8", CPU) == "int8"


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "fma"})
    with pytest.warns(SlowPrecisionWarning, match="no native bf16"):
        assert resolve_precision("bf16", CPU) == "bf16"
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("bf16", CPU) == "bf16" and resolve_precision("auto", CPU) == "fp32"


def test_an_int8_model_cannot_be_saved_as_a_checkpoint(fp32_and_int8, tmp_path):
    from clapcli.errors import ClapError

    with pytest.raises(ClapError, match="int8"):
        fp32_and_int8[1].save(tmp_path / "out")


def test_the_index_records_its_precisions_and_a_fresh_one_has_none(tmp_path, fp32_and_int8):
    from clapcli.index.store import IndexStore

    exact, fast = fp32_and_int8
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        assert store.precisions == []
        store.set_model_identity(fast.identity_dict)
        store.record_precision("int8")
        assert store.precisions == ["int8"]
        store.set_model_identity(exact.identity_dict)  # fp32 top-up: accepted, the same model
        store.record_precision("fp32")
        store.record_precision("int8")
        assert store.precisions == ["fp32", "int8"]
    with IndexStore.open(tmp_path / "rebuilt", create=True) as store:  # what a rebuild swaps in
        assert store.precisions == []


def test_label_cache_keeps_int8_embeddings_apart_from_fp32(fp32_and_int8, tmp_path):
    from clapcli.tagging.cache import cached_label_embeddings
    from clapcli.tagging.labels import resolve_labels

    exact, fast = fp32_and_int8
    labels = resolve_labels("dog,rain,piano")
    first = cached_label_embeddings(fast, labels, None, cache_dir=tmp_path)
    again = cached_label_embeddings(exact, labels, None, cache_dir=tmp_path)
    fresh = cached_label_embeddings(exact, labels, None, cache_dir=tmp_path / "other")
    np.testing.assert_array_equal(again, fresh)  # fp32 did not get int8's cached vectors
    assert not np.array_equal(first, again)


def test_clap_index_and_search_at_int8_through_the_cli(tiny_model_dir, tmp_path):
    """`clap index --precision int8` records int8; an fp32 search of that index is accepted (same model) and
    finds the file whose int8 embedding matches best; a top-up at fp32 records both precisions."""
    from audio_synth import write_audio
    from cli_runner import clap
    from clapcli.index.store import IndexStore

    lib, index_dir = tmp_path / "lib", tmp_path / "idx"
    lib.mkdir()
    for i, seconds in enumerate([1.0, 3.0]):
        write_audio(lib / f"clip{i}.wav", tone_noise(seconds, 48_000, seed=i), 48_000)
    summary = json.loads(clap("index", lib, "--index", index_dir, "--model", tiny_model_dir, "--precision", "int8",
                              "--json", "--workers", "0").stdout.splitlines()[-1])
    assert summary["precisions"] == ["int8"] and summary["reproducible"] is False
    with IndexStore.open(index_dir, readonly=True) as store:
        assert store.precisions == ["int8"]
    note = " ".join(clap("index", lib, "--index", index_dir, "--workers", "0").output.split())
    assert "holds vectors computed at int8" in note and "may differ slightly from a clean build" in note
    query = tmp_path / "query.wav"  # clip1 outside the index, so that it is embedded (at fp32), not looked up
    query.write_bytes((lib / "clip1.wav").read_bytes())
    hits = [json.loads(line) for line in clap("search", "--audio", query, "--index", index_dir,
                                               "--precision", "fp32", "--json").stdout.splitlines()]
    assert hits[0]["path"].endswith("clip1.wav") and hits[0]["score"] == pytest.approx(1.0, abs=0.005)
    write_audio(lib / "clip2.wav", tone_noise(2.0, 48_000, seed=7), 48_000)
    clap("index", lib, "--index", index_dir, "--precision", "fp32", "--json", "--workers", "0")
    with IndexStore.open(index_dir, readonly=True) as store:
        assert store.precisions == ["fp32", "int8"]


def test_an_fp32_index_says_nothing_about_reproducibility(tiny_model_dir, tmp_path):
    from audio_synth import write_audio
    from cli_runner import clap

    lib = tmp_path / "lib"
    lib.mkdir()
    write_audio(lib / "clip.wav", tone_noise(1.0, 48_000, seed=3), 48_000)
    args = ("index", lib, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--workers", "0")
    summary = json.loads(clap(*args, "--json").stdout.splitlines()[-1])  # --precision auto
    assert summary["precisions"] == ["fp32"] and summary["reproducible"] is True
    assert "clean build" not in clap(*args).output
