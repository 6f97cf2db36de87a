"""`clap index` below the CLI (index/build.py): one `IndexRequest` in, the floor loads the model (only when
something needs embedding), builds the index and saves the text-query graph itself; the command only parses
and renders."""

from __future__ import annotations

import pytest

import clapcli.engine.load
from audio_synth import tone_noise, write_audio
from clapcli.index.build import IndexRequest, ModelLoader, build
from clapcli.index.store import IndexStore


@pytest.fixture
def library(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    for i, seconds in enumerate([1.0, 3.0]):
        write_audio(lib / f"f{i}.wav", tone_noise(seconds, 16_000, seed=i), 16_000)
    return lib


@pytest.fixture
def loads(monkeypatch):
    """The (name, precision, text_only) of every `load_model` call, which still loads the real model."""
    calls, real = [], clapcli.engine.load.load_model

    def counting_load_model(name=None, *args, **kwargs):
        model = real(name, *args, **kwargs)
        calls.append((str(name), model.precision, kwargs.get("text_only", False)))
        return model

    monkeypatch.setattr(clapcli.engine.load, "load_model", counting_load_model)
    return calls


def _graphs(clap_home):
    return sorted((clap_home / "onnx").glob("text-*.onnx"))


def test_an_int8_request_builds_at_int8_and_saves_the_graph_from_an_fp32_text_half(library, tiny_model_dir,
                                                                                     tmp_path, clap_home, loads):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    idx = tmp_path / "idx"
    summary = build(IndexRequest(idx, roots=[library], model=str(tiny_model_dir), device="cpu", precision="int8",
                                 engine="auto", batch_size=2))
    assert (summary.added, summary.precisions) == (2, ["int8"])
    with IndexStore.open(idx, readonly=True) as store:
        assert store.precisions == ["int8"] and store.counts().ok_files == 2
    assert _graphs(clap_home)  # the post-build step is the floor's, not the command's
    # the build's model at int8, then the text half at fp32 for the graph
    assert [(p, text_only) for _, p, text_only in loads] == [("int8", False), ("fp32", True)]


def test_an_fp32_request_loads_once_and_a_refresh_with_nothing_to_embed_loads_nothing(library, tiny_model_dir,
                                                                                        tmp_path, clap_home, loads):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    request = IndexRequest(tmp_path / "idx", roots=[library], model=str(tiny_model_dir), device="cpu",
                           precision="fp32", engine="auto")
    assert build(request).added == 2
    assert len(loads) == 1 and _graphs(clap_home)  # the graph comes from the model the build loaded
    refresh = IndexRequest(request.index_dir, device="cpu", precision="fp32", engine="auto")  # no --model
    assert build(refresh).unchanged == 2
    assert len(loads) == 1  # nothing to embed: no model, no graph


def test_an_engine_of_torch_by_name_or_a_tokenizer_saves_no_graph(library, tiny_model_dir, tmp_path, clap_home):
    request = IndexRequest(tmp_path / "idx", roots=[library], model=str(tiny_model_dir), device="cpu",
                           engine="torch")
    assert not request.saves_text_query and not IndexRequest(tmp_path, tokenizer="tok").saves_text_query
    assert IndexRequest(tmp_path).saves_text_query and IndexRequest(tmp_path, engine="onnx").saves_text_query
    assert build(request).added == 2
    assert not _graphs(clap_home)


def test_the_loader_names_a_remembered_model_folder_that_has_moved(library, tiny_model_dir, tmp_path):
    from clapcli.errors import IndexStoreError

    gone = tmp_path / "moved-away"
    loader = ModelLoader(IndexRequest(tmp_path / "idx"))  # no --model: the name is the index's remembered one
    with pytest.raises(IndexStoreError, match="no longer exists.*--model NEW_PATH"):
        loader(str(gone))
    assert loader.model is None
    assert ModelLoader(IndexRequest(tmp_path / "idx", device="cpu"))(str(tiny_model_dir)).precision == "fp32"
