"""Issue 19, "dependencies that keep the promises": every model loaded through transformers is held to
safetensors (`--text-model`, `--k2c-model`, `--teacher`, a Wav2CLIP model's CLIP text tower). A tiny model
whose only weights are a pickled pytorch_model.bin is refused in one line, where transformers alone would
unpickle it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from clapcli.errors import CheckpointError
from test_captions import _tiny_k2c
from test_errors import run_main
from test_wav2clip_train import CLIP_DIM, save_tiny_clip


def pickled_only(directory: Path) -> Path:
    """The model in `directory` with its safetensors weights replaced by the same tensors in a pickled
    pytorch_model.bin (what `save_pretrained(safe_serialization=False)` wrote before transformers 5)."""
    from safetensors.torch import load_file

    for weights in directory.glob("*.safetensors"):
        torch.save(load_file(str(weights)), directory / "pytorch_model.bin")
        weights.unlink()
    return directory


@pytest.fixture(scope="module")
def pickled_clip(tmp_path_factory) -> Path:
    return pickled_only(save_tiny_clip(tmp_path_factory.mktemp("pickled") / "clip"))


def assert_refused(exc: pytest.ExceptionInfo, what: str) -> None:
    message = str(exc.value)
    assert message.startswith(what) and "only pickled weights (pytorch_model.bin)" in message, message
    assert "\n" not in message


def test_teacher_with_only_pickled_weights_is_refused(pickled_clip):
    from clapcli.train.teacher import ImageTeacher

    with pytest.raises(CheckpointError) as exc:
        ImageTeacher(str(pickled_clip))
    assert_refused(exc, "--teacher")


def test_text_model_with_only_pickled_weights_is_refused(pickled_clip):
    from clapcli.train.prepare import fresh_model

    with pytest.raises(CheckpointError) as exc:
        fresh_model("tiny-clip", str(pickled_clip), None)
    assert_refused(exc, "--text-model")


def test_wav2clip_text_tower_with_only_pickled_weights_is_refused(pickled_clip):
    from clapcli.models.wav2clip import load_clip_text

    with pytest.raises(CheckpointError) as exc:
        load_clip_text(str(pickled_clip), CLIP_DIM)
    assert_refused(exc, "the CLIP text tower")


def test_k2c_model_with_only_pickled_weights_is_one_error_line(tmp_path, monkeypatch, capsys):
    k2c = pickled_only(Path(_tiny_k2c(tmp_path / "k2c")))
    (tmp_path / "a.wav").write_bytes(b"")  # never read: the model is refused first
    with open(tmp_path / "m.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "tags"], ["a.wav", "dog"]])
    capsys.readouterr()  # not the progress bar of saving the tiny model
    code, err = run_main(monkeypatch, capsys, "shards", "make", tmp_path / "m.csv", "--out", tmp_path / "s",
                         "--captions-from-tags", "k2c", "--k2c-model", k2c, "--device", "cpu", "--workers", "0")
    assert code == 1
    assert err.startswith(f"error: --k2c-model {k2c} has only pickled weights (pytorch_model.bin)"), err
    assert len(err.strip().splitlines()) == 1


def test_the_same_models_with_safetensors_still_load(tmp_path):
    from clapcli.models.wav2clip import load_clip_text
    from clapcli.data.captions import KeywordToCaption
    from clapcli.train.teacher import ImageTeacher

    clip = save_tiny_clip(tmp_path / "clip")
    assert ImageTeacher(str(clip)).model is not None
    assert load_clip_text(str(clip), CLIP_DIM) is not None
    assert KeywordToCaption(_tiny_k2c(tmp_path / "k2c"), device="cpu").model is not None


# -- the Wav2CLIP download, checked against its SHA-256 --------------------------------------------------------


@pytest.fixture
def fake_release(tmp_path, monkeypatch):
    """A local file standing in for the Wav2CLIP release asset, served from a file:// URL, and an empty torch hub
    cache; returns (the file's bytes, a function that pins `wav2clip` to a SHA-256)."""
    import dataclasses

    from clapcli.models import registry

    payload = b"not really Wav2CLIP.pt " * 4096
    (tmp_path / "release").mkdir()
    (tmp_path / "release" / "Wav2CLIP.pt").write_bytes(payload)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def pin(sha256):
        known = dataclasses.replace(registry.KNOWN_MODELS["wav2clip"], sha256=sha256,
                                    url=(tmp_path / "release" / "Wav2CLIP.pt").as_uri())
        monkeypatch.setitem(registry.KNOWN_MODELS, "wav2clip", known)

    return payload, pin


def test_wav2clip_download_with_the_pinned_sha256_is_kept(fake_release):
    import hashlib

    from clapcli.models.registry import fetch

    payload, pin = fake_release
    pin(hashlib.sha256(payload).hexdigest())
    path = Path(fetch("wav2clip", download=True))
    assert path.name == "Wav2CLIP.pt" and path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["Wav2CLIP.pt"]


def test_wav2clip_download_with_another_sha256_is_deleted_and_one_error_line(fake_release, monkeypatch, capsys,
                                                                             tmp_path):
    payload, pin = fake_release
    pin("0" * 64)
    code, err = run_main(monkeypatch, capsys, "models", "pull", "wav2clip")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: the download of file://") and f"not the published {'0' * 64}" in err
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    assert list(cache.iterdir()) == []  # neither the file nor a temporary is left behind
    from clapcli.models.registry import is_cached

    assert not is_cached("wav2clip")


# -- the torch floor -------------------------------------------------------------------------------------------


def test_a_pt_file_is_refused_on_a_torch_whose_weights_only_can_be_bypassed(tmp_path, monkeypatch, capsys):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.setattr(torch, "__version__", "2.9.1+cpu")  # an install that kept an older torch (--no-deps)
    code, err = run_main(monkeypatch, capsys, "embed", "--text", "rain", "--model", path)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"refusing to load {path} with torch 2.9.1+cpu" in err and "CVE-2026-24747" in err
    assert "upgrade to torch>=2.10" in err


def test_the_declared_torch_floor_is_the_one_the_loader_holds_to():
    import re
    import tomllib

    from clapcli.models.weights import SAFE_TORCH

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    floors = {m.group(1): tuple(map(int, m.group(2).split("."))) for m in
              (re.match(r"(torch|torchaudio)>=([\d.]+)$", d.split(";")[0].strip()) for d in project["dependencies"])
              if m}
    assert floors == {"torch": SAFE_TORCH, "torchaudio": SAFE_TORCH}
    assert SAFE_TORCH >= (2, 10)  # CVE-2025-32434 (fixed in 2.6) and CVE-2026-24747 (fixed in 2.10)
    assert tuple(map(int, re.match(r"(\d+)\.(\d+)", torch.__version__).groups())) >= SAFE_TORCH
