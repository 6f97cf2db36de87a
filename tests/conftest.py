"""Shared fixtures: an isolated CLAP_HOME, no hub access, and tiny random checkpoints on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite runs the audio encoder in torch (the reference; exports per test would cost minutes);
# tests/test_onnx.py runs the onnxruntime engine, `auto` included, explicitly.
os.environ["CLAP_ENGINE"] = "torch"


@pytest.fixture(autouse=True)
def clap_home(tmp_path, monkeypatch):
    """Every test gets its own empty CLAP_HOME and Hugging Face cache, no hub access and no CLAP_MODEL."""
    home = tmp_path / "clap-home"
    monkeypatch.setenv("CLAP_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("CLAP_MODEL", raising=False)
    # An empty Hugging Face cache too: a developer who has the real laion/clap-htsat-fused cached must see what
    # a fresh machine sees (subprocesses read the variables, this process the constant huggingface_hub set).
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub / "hub"))
    return home


@pytest.fixture(scope="session")
def tiny_fused(tmp_path_factory):
    """(directory, transformers ClapModel, tokenizer, feature extractor) of a fused tiny model."""
    from tiny_models import save_hf_clap

    d = tmp_path_factory.mktemp("tiny-fused")
    return (d, *save_hf_clap(d, fused=True, seed=1))


@pytest.fixture(scope="session")
def tiny_unfused(tmp_path_factory):
    from tiny_models import save_hf_clap

    d = tmp_path_factory.mktemp("tiny-unfused")
    return (d, *save_hf_clap(d, fused=False, seed=2))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_fused) -> Path:
    """A saved tiny random fused model, usable as `--model PATH`."""
    return tiny_fused[0]


@pytest.fixture(scope="session")
def tiny_unfused_dir(tiny_unfused) -> Path:
    return tiny_unfused[0]
