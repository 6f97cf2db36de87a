"""`clap finetune`, `load_classifier` and `clap tag --classifier` on synthesised clips of four sound kinds
(tests/train_data.py) with the tiny random fused model: the head learns, tags held-out clips, the cache saves
every audio forward pass of a second run, `--full` changes the encoder, and wrong inputs fail clearly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cli_runner import clap
from test_errors import run_main
from train_data import KINDS, SR, clip

def class_folders(root: Path, per_kind: int, seed: int) -> list[tuple[Path, str]]:
    rng = np.random.default_rng(seed)
    files = []
    for kind in KINDS:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_kind):
            f = root / kind / f"{kind}_{seed}_{i:02d}.wav"
            sf.write(f, clip(kind, rng), SR)
            files.append((f, kind))
    return files


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A linear head trained through the CLI (--json) on 10 clips per kind, plus 4 held-out clips per kind."""
    root = tmp_path_factory.mktemp("finetune")
    class_folders(root / "train", per_kind=10, seed=0)
    held_out = class_folders(root / "held", per_kind=4, seed=99)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(root / "home"))
        result = clap("finetune", "--data", root / "train", "--model", tiny_model_dir, "--out", root / "clf",
                      "--epochs", "40", "--lr", "1e-2", "--batch-size", "8", "--seed", "0", "--json")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return root, root / "clf", held_out, lines


def test_linear_head_learns_the_training_split(trained):
    from clapcli import load_classifier

    root, out, _, _ = trained
    classifier = load_classifier(out, device="cpu")
    train = sorted((root / "train").rglob("*.wav"))
    probs = classifier.classify_files(train)  # (40, 4)
    predicted = [classifier.labels[i] for i in probs.argmax(axis=1)]
    accuracy = np.mean([p == f.parent.name for p, f in zip(predicted, train)])
    assert accuracy >= 0.9, accuracy
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # a single-label head's softmax


def test_tag_with_classifier_labels_held_out_clips(trained):
    """`clap tag --classifier` on clips no split ever saw: right far more often than chance (0.25)."""
    _, out, held_out, _ = trained
    result = clap("tag", *[f for f, _ in held_out], "--classifier", out, "--json", "--top", "2")
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(f) for f, _ in held_out]
    assert all(len(r["labels"]) == 2 and r["labels"][0]["cosine"] is None for r in rows)
    correct = np.mean([r["labels"][0]["label"] == kind for r, (_, kind) in zip(rows, held_out)])
    assert correct >= 0.6, correct
    from clapcli import load_classifier

    # the probabilities are the head's on the raw (un-normalised) embedding, as load_classifier computes them
    probs = load_classifier(out, device="cpu").classify_files([held_out[0][0]])[0]
    classifier_labels = json.loads((out / "classifier.json").read_text())["labels"]
    for entry in rows[0]["labels"]:
        assert entry["prob"] == pytest.approx(float(probs[classifier_labels.index(entry["label"])]), abs=1e-5)
    csv_out = clap("tag", held_out[0][0], "--classifier", out, "--csv").stdout.splitlines()
    assert csv_out[0] == "path,label,prob,cosine,start,end" and len(csv_out) == 1 + len(KINDS)


def test_tag_classifier_timeline_scores_raw_windows(trained, tmp_path):
    """--timeline on a 12 s file: one row per 10 s window, each the head's probabilities of that window's
    raw embedding."""
    from clapcli import load_classifier

    _, out, _, _ = trained
    rng = np.random.default_rng(11)
    wave = np.concatenate([clip("hum", rng) for _ in range(16)])[: 12 * SR]  # 16 clips last ≥ 12.8 s
    sf.write(tmp_path / "long.wav", wave, SR)
    row = json.loads(clap("tag", tmp_path / "long.wav", "--classifier", out, "--timeline", "--json",
                          "--top", "4").stdout)
    assert [(w["start"], w["end"]) for w in row["timeline"]] == [(0.0, 10.0), (2.0, 12.0)]
    classifier = load_classifier(out, device="cpu")
    item = next(classifier.model.embed_files([tmp_path / "long.wav"], segments=True, normalize=False))
    for window, segment in zip(row["timeline"], item.segments):
        probs = classifier.probabilities(segment.embedding)[0]
        got = {e["label"]: e["prob"] for e in window["labels"]}
        assert got == {label: pytest.approx(float(p), abs=1e-5) for label, p in zip(classifier.labels, probs)}


def test_json_lines_and_classifier_directory(trained, tiny_model_dir):
    from clapcli import load_model

    _, out, _, lines = trained
    epochs, summary = lines[:-1], lines[-1]
    assert [e["epoch"] for e in epochs] == list(range(1, 41))
    assert all("val_top1" in e and "val_top5" in e and "train_loss" in e for e in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    best = min(epochs, key=lambda e: (-e["val_top1"], e["val_loss"]))  # best top-1, ties to the lower loss
    assert summary["best_epoch"] == best["epoch"]
    assert summary["val_top1"] == best["val_top1"] and summary["labels"] == sorted(KINDS)
    assert summary["train_clips"] == 32 and summary["val_clips"] == 8  # 2 of each kind's 10 held out
    meta = json.loads((out / "classifier.json").read_text())
    assert (out / "head.safetensors").is_file() and not (out / "model").exists()
    assert meta["labels"] == sorted(KINDS) and meta["multi_label"] is False and meta["head"]["kind"] == "linear"
    assert meta["encoder_fingerprint"] == load_model(tiny_model_dir, device="cpu").fingerprint
    assert meta["encoder"]["model"] == str(Path(tiny_model_dir).resolve())
    assert meta["options"]["epochs"] == 40 and len(meta["metrics"]["history"]) == 40


def test_classifier_of_another_base_model_is_refused(trained, tiny_unfused_dir, monkeypatch, capsys):
    _, out, held_out, _ = trained
    code, err = run_main(monkeypatch, capsys, "tag", held_out[0][0], "--classifier", out,
                         "--model", tiny_unfused_dir)
    assert code == 2
    assert str(Path(tiny_unfused_dir).resolve()) in err and "trained on model" in err
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["encoder"]["model"] in err and meta["encoder_fingerprint"] in err


def test_second_frozen_finetune_does_no_audio_forward(tmp_path, tiny_model_dir, monkeypatch):
    """The raw embeddings are cached by (model fingerprint, content hash): a second run, with the files
    renamed even, never calls the audio encoder; the cached vectors are the un-normalised embeddings."""
    from clapcli import load_model
    from clapcli.models.clap import ClapModel
    from clapcli.train.finetune import FinetuneConfig, finetune

    files = class_folders(tmp_path / "data", per_kind=3, seed=5)
    calls = []
    real = ClapModel.encode_audio
    monkeypatch.setattr(ClapModel, "encode_audio", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    model = load_model(tiny_model_dir, device="cpu", precision="fp32")
    cfg = FinetuneConfig(str(tmp_path / "data"), epochs=2, batch_size=4)
    finetune(cfg, tmp_path / "one", model=model)
    assert len(calls) > 0
    first = len(calls)
    for f, _ in files:
        f.rename(f.with_name("renamed_" + f.name))
    finetune(cfg, tmp_path / "two", model=model)
    assert len(calls) == first  # no forward pass at all
    cached = sorted((tmp_path / "clap-home" / "finetune-embeddings" / model.fingerprint).glob("*.npy"))
    assert len(cached) == len(files)
    direct = next(model.embed_files([next((tmp_path / "data").rglob("*.wav"))], segments=False, normalize=False))
    norms = np.linalg.norm(direct.embedding)
    assert not np.isclose(norms, 1.0, atol=1e-3)  # raw projection output, not L2-normalised
    assert any(np.allclose(np.load(c), direct.embedding, atol=1e-6) for c in cached)


def test_multi_label_reports_map(tmp_path, tiny_model_dir):
    """Clips of two kinds mixed, labels as JSON lists and 'a;b': BCE training, mAP/mAUC per epoch, a sigmoid
    head, and `evaluate_classifier` reproduces the reported validation mAP."""
    from clapcli import load_classifier
    from clapcli.train.finetune import FinetuneConfig, evaluate_classifier, finetune
    from clapcli.eval.metrics import multilabel_map

    rng = np.random.default_rng(3)
    (tmp_path / "audio").mkdir()
    pairs = [(a, b) for i, a in enumerate(KINDS) for b in KINDS[i + 1:]]
    rows = {"train": [], "val": []}
    for n in range(5):
        for a, b in pairs:
            x, y = clip(a, rng), clip(b, rng)
            f = tmp_path / "audio" / f"{a}_{b}_{n}.wav"
            sf.write(f, 0.5 * (x[: min(len(x), len(y))] + y[: min(len(x), len(y))]), SR)
            labels = json.dumps([a, b]) if n % 2 else f"{a};{b}"
            rows["val" if n == 4 else "train"].append({"path": f"audio/{f.name}", "labels": labels})
    for split, split_rows in rows.items():
        with open(tmp_path / f"{split}.jsonl", "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in split_rows)
    cfg = FinetuneConfig(str(tmp_path / "train.jsonl"), val=str(tmp_path / "val.jsonl"), multi_label=True,
                         epochs=15, lr=1e-2, batch_size=8, model=str(tiny_model_dir), device="cpu")
    classifier = finetune(cfg, tmp_path / "clf")
    history = classifier.metrics["history"]
    assert all(0.0 <= r["val_mAP"] <= 1.0 and 0.0 <= r["val_mAUC"] <= 1.0 for r in history)
    assert classifier.multi_label and classifier.labels == sorted(KINDS)
    loaded = load_classifier(tmp_path / "clf", device="cpu")
    val_files = [tmp_path / r["path"] for r in rows["val"]]
    probs = loaded.classify_files(val_files)
    assert not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3)  # independent sigmoids, not a softmax
    targets = np.array([[k in Path(f).stem.split("_")[:2] for k in loaded.labels] for f in val_files], dtype=int)
    assert multilabel_map(probs, targets) == pytest.approx(classifier.metrics["best"]["val_mAP"], abs=1e-6)
    report = evaluate_classifier(tmp_path / "clf", tmp_path / "val.jsonl", device="cpu")
    assert report["mAP"] == pytest.approx(classifier.metrics["best"]["val_mAP"], abs=1e-6)
    assert report["clips"] == len(val_files) and report["multi_label"] is True


def test_full_finetune_changes_the_encoder_and_loads(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from clapcli import load_classifier, load_model

    class_folders(tmp_path / "data", per_kind=2, seed=7)
    clap("finetune", "--data", tmp_path / "data", "--model", tiny_model_dir, "--out", tmp_path / "clf", "--full",
         "--epochs", "1", "--batch-size", "4", "--encoder-lr", "1e-3", "--device", "cpu", "--json")
    base = load_model(tiny_model_dir, device="cpu")
    tuned = load_file(str(tmp_path / "clf" / "model" / "model.safetensors"))
    base_state = base.model.state_dict()
    audio_changed = [k for k in tuned if k.startswith("audio_") and not base_state[k].equal(tuned[k])]
    text_changed = [k for k in tuned if k.startswith("text_model.") and not base_state[k].equal(tuned[k])]
    assert audio_changed and not text_changed
    classifier = load_classifier(tmp_path / "clf", device="cpu")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert classifier.model.fingerprint == meta["encoder_fingerprint"] != base.fingerprint
    assert meta["base"]["weights"] == base.identity_dict["weights"]
    probs = classifier.classify_files(sorted((tmp_path / "data").rglob("*.wav")))
    assert probs.shape == (8, 4)
    with pytest.raises(Exception, match="trained on model"):  # the base model is not the finetuned encoder
        load_classifier(tmp_path / "clf", model=base)


def test_data_errors_are_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    files = class_folders(tmp_path / "data", per_kind=2, seed=1)
    model = ["--model", tiny_model_dir, "--epochs", "1"]

    manifest = tmp_path / "dupes.csv"
    manifest.write_text("path,label\n" + "".join(f"{f},{k}\n" for f, k in files) + f"{files[0][0]},{files[0][1]}\n")
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", manifest, *model, "--out", tmp_path / "o1")
    assert code == 1 and "listed more than once" in err and str(files[0][0]) in err

    (tmp_path / "data" / "silence").mkdir()
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", tmp_path / "data", *model, "--out", tmp_path / "o2")
    assert code == 1 and "empty class folder(s): silence" in err
    (tmp_path / "data" / "silence").rmdir()

    bad = tmp_path / "data" / "hum" / "broken.wav"
    bad.write_bytes(b"not audio at all")
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", tmp_path / "data", *model, "--out", tmp_path / "o3")
    assert code == 1 and "broken.wav" in err and "cannot read audio" in err
    bad.unlink()

    multi = tmp_path / "multi.csv"
    multi.write_text("path,labels\n" + "".join(f"{f},{k};hiss\n" for f, k in files))
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", multi, *model, "--out", tmp_path / "o4")
    assert code == 2 and "--multi-label" in err

    unknown = tmp_path / "val.csv"
    unknown.write_text(f"path,label\n{files[0][0]},thunder\n")
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", tmp_path / "data", "--val", unknown, *model,
                         "--out", tmp_path / "o5")
    assert code == 1 and "thunder" in err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing half-written


def test_manifest_labels_and_stratified_split(tmp_path):
    from clapcli.train.classifier_data import stratified_split
    from clapcli.data.labelled import LabelledClip, read_labelled

    (tmp_path / "m.jsonl").write_text(
        json.dumps({"path": "a.wav", "labels": ["dog", "rain"]}) + "\n"
        + json.dumps({"path": "b.wav", "labels": "dog; siren;dog"}) + "\n"
        + json.dumps({"path": "c.wav", "label": "rain"}) + "\n")
    clips = read_labelled(tmp_path / "m.jsonl")
    assert [c.all_labels for c in clips] == [("dog", "rain"), ("dog", "siren"), ("rain",)]
    assert [c.label for c in clips] == ["dog", "dog", "rain"]

    clips = [LabelledClip(Path(f"{k}{i}.wav"), k) for k in "abc" for i in range(10)] + [LabelledClip(Path("d.wav"), "d")]
    train, val = stratified_split(clips, 0.2, seed=4)
    assert sorted(c.label for c in val) == ["a", "a", "b", "b", "c", "c"]  # a lone clip stays in training
    assert len(train) + len(val) == len(clips) and not {c.path for c in train} & {c.path for c in val}
    assert stratified_split(clips, 0.2, seed=4) == (train, val)
    assert stratified_split(clips, 0.2, seed=5)[1] != val


def test_shards_with_tags_are_training_data(tmp_path, tiny_model_dir):
    """`clap shards make` output with a `tags` column: the tags are the classes."""
    from clapcli.train.finetune import FinetuneConfig, finetune
    from train_data import make_dataset

    manifest = make_dataset(tmp_path / "src", per_kind=3, seed=2)
    clap("shards", "make", manifest, "--out", tmp_path / "shards", "--shard-size", "8")
    cfg = FinetuneConfig(str(tmp_path / "shards"), epochs=2, batch_size=4, model=str(tiny_model_dir), device="cpu")
    classifier = finetune(cfg, tmp_path / "clf")
    assert classifier.labels == sorted(KINDS)
    assert classifier.metrics["train_clips"] + classifier.metrics["val_clips"] == 12


def test_eval_classifier_reports_what_tag_classifier_predicts(trained):
    root, out, held_out, _ = trained
    metrics = json.loads(clap("eval", "classifier", "--classifier", out, "--data", root / "held", "--json").stdout)
    rows = [json.loads(line) for line in clap("tag", *[f for f, _ in held_out], "--classifier", out, "--json",
                                               "--top", "1").stdout.splitlines()]
    top1 = np.mean([r["labels"][0]["label"] == kind for r, (_, kind) in zip(rows, held_out)])
    assert metrics["clips"] == len(held_out) and metrics["top1"] == pytest.approx(top1)
    assert metrics["top5"] == 1.0  # 4 classes


def test_an_existing_classifier_is_replaced_only_with_overwrite(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The default --out of a rerun is the same folder: an earlier --full model survives it unless --overwrite,
    and the refusal comes before any training."""
    class_folders(tmp_path / "data", per_kind=2, seed=3)
    monkeypatch.chdir(tmp_path)
    args = ["finetune", "--data", tmp_path / "data", "--model", tiny_model_dir, "--epochs", "1", "--batch-size", "4",
            "--device", "cpu"]
    clap(*args, "--full")
    out = tmp_path / "data-classifier"
    before = (out / "classifier.json").read_bytes()
    assert (out / "model" / "model.safetensors").is_file()

    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and "already holds a classifier" in err and "--overwrite" in err
    assert err.count("\n") == 1 and "epoch" not in err  # refused up front, nothing trained
    assert (out / "classifier.json").read_bytes() == before and (out / "model" / "model.safetensors").is_file()

    clap(*args, "--overwrite")
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["options"]["full"] is False and not (out / "model").exists()


def _fake_mount_point(monkeypatch, mount: Path) -> None:
    """`mount` behaves as a mount point: os.path.ismount says so, and renaming it fails with EBUSY."""
    import errno
    import os

    real_replace, real_rename, real_ismount = os.replace, os.rename, os.path.ismount

    def refuse(real):
        def move(src, dst, *a, **k):
            if Path(src).absolute() == mount.absolute():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
            return real(src, dst, *a, **k)
        return move

    monkeypatch.setattr(os, "replace", refuse(real_replace))
    monkeypatch.setattr(os, "rename", refuse(real_rename))
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p).absolute() == mount.absolute() or real_ismount(p))


def test_an_empty_mount_point_as_out_is_filled_in_place(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from clapcli import load_classifier

    class_folders(tmp_path / "data", per_kind=2, seed=4)
    mount = tmp_path / "mnt"
    mount.mkdir()
    _fake_mount_point(monkeypatch, mount)
    args = ["finetune", "--data", tmp_path / "data", "--model", tiny_model_dir, "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--out", mount]
    code, err = run_main(monkeypatch, capsys, *args, "--full")
    assert code == 0, err
    assert sorted(p.name for p in mount.iterdir()) == ["classifier.json", "head.safetensors", "model"]
    assert load_classifier(mount, device="cpu").labels == sorted(KINDS)

    # holding a classifier, the mount point cannot be swapped by a rename: refused before training
    code, err = run_main(monkeypatch, capsys, *args, "--overwrite")
    assert code == 2 and "mount point" in err and "epoch" not in err
    assert load_classifier(mount, device="cpu").labels == sorted(KINDS)


def _small_classifier(directory: Path) -> Path:
    from clapcli.models.classifier import HeadConfig, build_head, save_classifier

    directory.mkdir()
    cfg = HeadConfig("mlp", 8, 3, hidden=4)
    save_classifier(directory, build_head(cfg), cfg, ["a", "b", "c"], False, {"model": "m"}, "fp", {"model": "m"},
                    {}, {})
    return directory


@pytest.mark.parametrize("change, message", [
    ({"dim": 10**7, "hidden": 10**7}, "head dim 10000000 is not a width from 1 to 65536"),
    ({"n_labels": 10**7}, "head n_labels 10000000 is not a width"),
    ({"n_labels": 4}, "the head has 4 outputs but the file lists 3 labels"),
    ({"dim": 60_000, "hidden": 60_000}, "head.safetensors: tensor 0.mean is F32 [8], classifier.json implies F32 [60000]"),
])
def test_a_classifier_declaring_absurd_sizes_is_refused_before_allocating(tmp_path, monkeypatch, capsys, change,
                                                                          message):
    """Widths from classifier.json are checked against sane limits and the safetensors header (shapes, and
    offsets inside the file) before the head is built: 60000 × 60000 would allocate 14 GB first."""
    from clapcli.models.classifier import read_classifier

    directory = _small_classifier(tmp_path / "clf")
    assert read_classifier(directory).labels == ["a", "b", "c"]
    meta = json.loads((directory / "classifier.json").read_text())
    meta["head"].update(change)
    (directory / "classifier.json").write_text(json.dumps(meta))
    clip_path = tmp_path / "x.wav"
    sf.write(clip_path, np.zeros(4800, np.float32), 48_000)
    code, err = run_main(monkeypatch, capsys, "tag", clip_path, "--classifier", directory)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1


def test_a_safetensors_header_declaring_tensors_beyond_the_file_is_refused(tmp_path):
    """The shapes agree with classifier.json, but the header claims data the file does not hold."""
    import struct

    from clapcli.errors import ClapError
    from clapcli.models.classifier import read_classifier

    directory = _small_classifier(tmp_path / "clf")
    meta = json.loads((directory / "classifier.json").read_text())
    meta["head"].update(dim=60_000, hidden=60_000)
    (directory / "classifier.json").write_text(json.dumps(meta))
    shapes = {"0.mean": [60_000], "0.std": [60_000], "1.weight": [60_000, 60_000], "1.bias": [60_000],
              "4.weight": [3, 60_000], "4.bias": [3]}
    header, at = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + size]}
        at += size
    text = json.dumps(header).encode()
    (directory / "head.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 1024)
    with pytest.raises(ClapError, match=r"head\.safetensors: tensor 0\.mean lies outside the file"):
        read_classifier(directory)
    (directory / "head.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ClapError, match="not a safetensors file .its header declares 1099511627776 bytes"):
        read_classifier(directory)
