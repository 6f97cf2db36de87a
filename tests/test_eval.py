"""`clap eval retrieval|zeroshot` through the CLI: the numbers equal the metric functions on embeddings
computed independently, a case built to be right scores 1 and its reversal 0, ESC-50's layout and folds are
read, and bad data or options fail with the right exit code."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from clapcli.cli.main import app
from clapcli.eval.metrics import a2t_map10_laion_quirk, retrieval_metrics
from clapcli.data.shards import iter_shard, list_shards
from test_errors import run_main
from train_data import KINDS, SR, clip, make_dataset

runner = CliRunner()

RETRIEVAL_KEYS = {"task", "data", "split", "audios", "captions", "skipped", "skipped_files", "metrics", "model",
                  "fingerprint"}
ZEROSHOT_KEYS = {"task", "data", "labelset", "labels", "templates", "fold", "clips", "skipped", "skipped_files",
                 "metrics", "per_class", "confusions", "model", "fingerprint"}
METRIC_KEYS = {f"{d}_{m}" for d in ("t2a", "a2t")
               for m in ("R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank")} | {"a2t_mAP@10_laion_quirk"}


def clap(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (result.output, result.exception)
    return result


def json_out(result) -> dict:
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The four-kind toy set (16 clips, 2 captions each) and its shards, half of them in val/."""
    root = tmp_path_factory.mktemp("eval-toy")
    manifest = make_dataset(root, per_kind=4, seed=3)
    clap("shards", "make", manifest, "--out", root / "shards", "--val-fraction", "0.5", "--shard-size", "3",
         "--seed", "2", "--workers", "0")
    return root


def direct_metrics(model_dir: Path, pairs: list[tuple[Path | np.ndarray, list[str]]]) -> dict:
    """retrieval_metrics on embeddings of each clip (a file, or 48 kHz samples) and its captions, one
    `embed_audio` / `embed_text` call each: no shard reader, batching or caption bookkeeping of `clap eval`."""
    from clapcli import load_model

    model = load_model(model_dir, device="cpu", precision="fp32")
    audio = model.embed_audio([p for p, _ in pairs], sample_rate=48_000)
    text = model.embed_text([c for _, caps in pairs for c in caps])
    owner = np.repeat(np.arange(len(pairs)), [len(caps) for _, caps in pairs])
    out = retrieval_metrics(audio, text, owner)
    out["a2t_mAP@10_laion_quirk"] = a2t_map10_laion_quirk(audio, text, owner)
    return out


def shard_pairs(split_dir: Path) -> list[tuple[np.ndarray, list[str]]]:
    """(the FLAC member read with soundfile, the captions) of every sample, in shard order."""
    return [(sf.read(io.BytesIO(raw.audio_bytes), dtype="float32")[0], raw.meta["text"])
            for tar in list_shards(split_dir) for raw in iter_shard(tar)]


def assert_same_metrics(reported: dict, expected: dict) -> None:
    assert set(reported) == METRIC_KEYS
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, abs=1e-5), key


def test_retrieval_on_shards_equals_metrics_on_direct_embeddings(toy, tiny_model_dir):
    summary = json_out(clap("eval", "retrieval", "--data", toy / "shards", "--model", tiny_model_dir,
                            "--device", "cpu", "--precision", "fp32", "-b", "3", "--json"))
    assert set(summary) == RETRIEVAL_KEYS
    pairs = shard_pairs(toy / "shards" / "val")
    assert summary["split"] == "val" and summary["skipped"] == 0
    assert summary["audios"] == len(pairs) == 8 and summary["captions"] == 16
    expected = direct_metrics(tiny_model_dir, pairs)
    assert_same_metrics(summary["metrics"], expected)
    assert summary["metrics"]["t2a_R@10"] == 1.0  # 8 clips: every caption's clip is in the top 10

    train = json_out(clap("eval", "retrieval", "--data", toy / "shards", "--split", "train", "--model",
                          tiny_model_dir, "--device", "cpu", "--json"))
    train_pairs = shard_pairs(toy / "shards" / "train")
    assert train["split"] == "train" and train["audios"] == len(train_pairs) == 8
    assert_same_metrics(train["metrics"], direct_metrics(tiny_model_dir, train_pairs))


def test_retrieval_on_a_manifest_skips_unreadable_files_and_says_so(toy, tiny_model_dir, tmp_path):
    with open(toy / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    (tmp_path / "broken.wav").write_bytes(b"RIFF not really a wav file")
    rows += [{"path": str(tmp_path / "broken.wav"), "caption": "a broken file", "tags": ""},
             {"path": str(tmp_path / "missing.wav"), "caption": "a missing file", "tags": ""}]
    manifest = tmp_path / "eval.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "tags"])
        writer.writeheader()
        writer.writerows({**r, "path": str(toy / r["path"]) if not Path(r["path"]).is_absolute() else r["path"]}
                         for r in rows)
    result = clap("eval", "retrieval", "--data", manifest, "--model", tiny_model_dir, "--device", "cpu", "--json",
                  code=1)
    summary = json_out(result)
    assert summary["skipped"] == 2 and summary["audios"] == 16 and summary["captions"] == 32
    assert {Path(s["path"]).name for s in summary["skipped_files"]} == {"broken.wav", "missing.wav"}
    assert "broken.wav" in result.stderr and "2 clip(s) skipped" in result.stderr
    good = [(toy / r["path"], json.loads(r["caption"])) for r in rows[:-2]]
    assert_same_metrics(summary["metrics"], direct_metrics(tiny_model_dir, good))


def test_retrieval_table_on_a_terminal(toy, tiny_model_dir):
    manifest = toy / "three.jsonl"
    manifest.write_text("".join(json.dumps({"path": f"audio/{kind}_000.wav", "caption": [kind, f"a {kind}"]}) + "\n"
                                for kind in KINDS[:3]))
    out = clap("eval", "retrieval", "--data", manifest, "--model", tiny_model_dir, "--device", "cpu").stdout
    assert "text→audio" in out and "audio→text" in out and "median rank" in out and "3 clips, 6 captions" in out


# ------------------------------------------------------------------------------------------------ zero-shot

ESC_CLASSES = {"hum": "door_wood_knock", "whistle": "crying_baby", "hiss": "sea_waves", "clicks": "dog"}


@pytest.fixture(scope="module")
def esc50(tmp_path_factory):
    """A miniature of the public ESC-50 layout: meta/esc50.csv and audio/, one clip per class in each of
    folds 1 and 2, classes named with underscores as ESC-50 names them."""
    root = tmp_path_factory.mktemp("ESC-50-master")
    (root / "audio").mkdir()
    (root / "meta").mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for fold in (1, 2):
        for target, kind in enumerate(KINDS):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            sf.write(root / "audio" / name, clip(kind, rng), SR)
            rows.append({"filename": name, "fold": fold, "target": target, "category": ESC_CLASSES[kind],
                         "esc10": "False", "src_file": 100 + target, "take": "A"})
    with open(root / "meta" / "esc50.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def text_embeddings_from_audio(monkeypatch, model_dir: Path, files: dict[str, Path], template: str, shift: int):
    """Make the model's text tower answer the prompt of label l with the audio embedding of files[l'], where
    l' is l itself (shift 0) or the next label (shift 1); every other prompt gets a random unit vector."""
    from clapcli import load_model
    from clapcli.engine.clap import Clap

    model = load_model(model_dir, device="cpu", precision="fp32")
    labels = list(files)
    audio = model.embed_audio([files[label] for label in labels])
    assert np.max(audio @ audio.T - np.eye(len(labels)) * 2) < 0.999  # distinct clips: no tie with the answer
    table = {template.replace("{}", label): audio[(i + shift) % len(labels)] for i, label in enumerate(labels)}
    rng = np.random.default_rng(0)

    def embed_text(self, texts, batch_size=64):
        out = []
        for text in texts:
            v = table.get(text)
            if v is None:
                v = rng.standard_normal(self.dim).astype(np.float32)
                v /= np.linalg.norm(v)
            out.append(v)
        return np.stack(out)

    monkeypatch.setattr(Clap, "embed_text", embed_text)


@pytest.mark.parametrize("shift, accuracy", [(0, 1.0), (1, 0.0)])
def test_zeroshot_known_answer_and_its_reversal_on_esc50_fold(esc50, tiny_model_dir, monkeypatch, shift, accuracy):
    fold1 = {ESC_CLASSES[kind].replace("_", " "): esc50 / "audio" / f"1-{100 + t}-A-{t}.wav"
             for t, kind in enumerate(KINDS)}
    text_embeddings_from_audio(monkeypatch, tiny_model_dir, fold1, "This is a sound of {}.", shift)
    result = clap("eval", "zeroshot", "--data", esc50 / "meta" / "esc50.csv", "--labels", "esc50", "--fold", "1",
                  "--model", tiny_model_dir, "--device", "cpu", "--json")
    summary = json_out(result)
    assert set(summary) == ZEROSHOT_KEYS
    assert summary["clips"] == 4 and summary["fold"] == 1 and summary["labels"] == 50
    assert summary["labelset"] == "esc50" and summary["templates"] == ["This is a sound of {}."]
    assert summary["metrics"]["top1"] == accuracy
    assert {c["label"]: c["accuracy"] for c in summary["per_class"]} == {label: accuracy for label in fold1}
    labels = list(fold1)
    if shift:  # the clip of class i + 1 matches label i's prompt exactly: four confused pairs, once each
        assert summary["metrics"]["mean_rank"] > 1.0
        expected = {(labels[(i + 1) % 4], labels[i]) for i in range(4)}
        assert {(c["target"], c["predicted"]) for c in summary["confusions"]} == expected
        assert all(c["count"] == 1 for c in summary["confusions"])
    else:
        assert summary["confusions"] == [] and summary["metrics"]["mAP@10"] == 1.0


def dual_directions(audio: np.ndarray, spread: float = 1000.0) -> np.ndarray:
    """(L, D) unit vectors d_j, nearly orthonormal, with audio_i · d_j = 0 for i ≠ j and > 0 for i = j: the
    pseudo-inverse's columns plus a large component orthogonal to every clip (D ≫ L leaves room)."""
    a = audio.astype(np.float64)  # (L, D)
    dual = np.linalg.pinv(a).T  # (L, D): a @ dual.T = I
    basis, _ = np.linalg.qr(np.concatenate([a, np.random.default_rng(1).standard_normal((len(a), a.shape[1]))]).T)
    extra = basis[:, len(a):].T  # (L, D) orthonormal and orthogonal to every clip
    d = dual + spread * extra
    return (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float32)


def test_zeroshot_prompt_ensemble_and_exclude_on_class_folders(tmp_path, tiny_model_dir, monkeypatch):
    """Two templates that are each wrong for every clip and right together: label j's prompts point at clip j
    plus 1.5 × its right (first template) or left (second template) neighbour, so alone each prefers a
    neighbour, and only their average (the ensemble) puts clip j first. --exclude drops a label and its clips."""
    rng = np.random.default_rng(9)
    files = {}
    for kind in KINDS:
        (tmp_path / "data" / kind).mkdir(parents=True)
        files[kind] = tmp_path / "data" / kind / f"{kind}.wav"
        sf.write(files[kind], clip(kind, rng), SR)
    from clapcli import load_model
    from clapcli.engine.clap import Clap

    d = dual_directions(load_model(tiny_model_dir, device="cpu").embed_audio([files[k] for k in KINDS]))
    n = len(KINDS)
    table = {}
    for j, kind in enumerate(KINDS):
        table[f"a {kind}"] = d[j] + 1.5 * d[(j - 1) % n]  # alone: clip j prefers label j + 1
        table[f"the {kind}"] = d[j] + 1.5 * d[(j + 1) % n]  # alone: clip j prefers label j - 1
    monkeypatch.setattr(Clap, "embed_text", lambda self, texts, batch_size=64: np.stack([table[t] for t in texts]))
    base = ["eval", "zeroshot", "--data", tmp_path / "data", "--labels", ",".join(KINDS), "--model",
            tiny_model_dir, "--device", "cpu", "--json"]
    assert json_out(clap(*base, "--template", "a {}"))["metrics"]["top1"] == 0.0
    assert json_out(clap(*base, "--template", "the {}"))["metrics"]["top1"] == 0.0
    both = json_out(clap(*base, "--template", "a {}", "--template", "the {}"))
    assert both["templates"] == ["a {}", "the {}"] and both["metrics"]["top1"] == 1.0

    excluded = json_out(clap(*base, "--template", "a {}", "--exclude", "hiss"))
    assert excluded["labels"] == 3 and excluded["clips"] == 3
    assert {c["label"] for c in excluded["per_class"]} == {"hum", "whistle", "clicks"}

    table_out = clap(*base[:-1], "--template", "the {}", "--per-class").stdout
    assert "top-1 accuracy" in table_out and "per class" in table_out and "most confused" in table_out


def test_zeroshot_all_folds_and_underscore_classes(esc50, tiny_model_dir):
    summary = json_out(clap("eval", "zeroshot", "--data", esc50, "--labels", "esc50", "--model", tiny_model_dir,
                            "--device", "cpu", "--json"))
    assert summary["clips"] == 8 and summary["fold"] is None
    assert {c["label"]: c["clips"] for c in summary["per_class"]} == {
        "door wood knock": 2, "crying baby": 2, "sea waves": 2, "dog": 2}


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["zeroshot", "--data", "{esc}", "--labels", "dog,rain"], 2, "not in the label set"),
        (["zeroshot", "--data", "{esc}", "--labels", "esc50", "--fold", "7"], 2, "has folds 1, 2"),
        (["zeroshot", "--data", "{folders}", "--labels", "esc50", "--fold", "1"], 2, "--fold needs a manifest"),
        (["zeroshot", "--data", "{folders}", "--labels", "hum,whistle", "--exclude", "bark"], 2, "--exclude"),
        (["zeroshot", "--data", "{missing}", "--labels", "esc50"], 2, "no such folder"),
        (["zeroshot", "--data", "{esc}", "--labels", "esc50", "-t", "no slot"], 2, "exactly one"),
        (["retrieval", "--data", "{missing}"], 2, "no such folder"),
        (["retrieval", "--data", "{folders}"], 1, "no .tar shards"),
        (["retrieval", "--data", "{esc}/meta/esc50.csv", "--split", "val"], 2, "--split applies"),
    ],
)
def test_bad_data_and_options_fail_with_one_line(esc50, tmp_path, monkeypatch, capsys, args, code, message):
    """Each is caught before the model loads: --model names nothing, and the error is still the data's."""
    folders = tmp_path / "folders"
    for kind in ("hum", "whistle", "unicorn_song"):
        (folders / kind).mkdir(parents=True)
        sf.write(folders / kind / "x.wav", np.zeros(1600, np.float32), SR)
    values = {"esc": esc50, "folders": folders, "missing": tmp_path / "nowhere"}
    args = [a.format(**values) for a in args]
    exit_code, err = run_main(monkeypatch, capsys, "eval", *args, "--model", tmp_path / "no-model")
    assert exit_code == code, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_unknown_classes_are_listed(tmp_path, monkeypatch, capsys):
    for name in ("dog", "unicorn_song", "dragon"):
        (tmp_path / name).mkdir()
        sf.write(tmp_path / name / "x.wav", np.zeros(1600, np.float32), SR)
    code, err = run_main(monkeypatch, capsys, "eval", "zeroshot", "--data", tmp_path, "--labels", "esc50")
    assert code == 2 and "2 class(es)" in err and "'dragon'" in err and "'unicorn_song'" in err


def test_nothing_readable_is_a_data_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "x.wav").write_bytes(b"RIFF but not audio")
    code, err = run_main(monkeypatch, capsys, "eval", "zeroshot", "--data", tmp_path, "--labels", "esc50",
                         "--model", tiny_model_dir, "--device", "cpu")
    assert code == 1 and "no clip could be evaluated (1 skipped)" in err and "x.wav" in err


def test_zeroshot_on_multi_label_rows_reports_map_over_every_class(tmp_path, tiny_model_dir, monkeypatch):
    """Rows with several `labels`: mAP over the labels, with each clip's every class a positive."""
    from clapcli import load_model
    from clapcli.engine.clap import Clap
    from clapcli.eval.metrics import multilabel_map

    rng = np.random.default_rng(4)
    rows, files = [], []
    for i, kind in enumerate(KINDS):
        files.append(tmp_path / f"{kind}.wav")
        sf.write(files[-1], clip(kind, rng), SR)
        rows.append({"path": files[-1].name, "labels": [kind, KINDS[(i + 1) % len(KINDS)]]})
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    audio = load_model(tiny_model_dir, device="cpu").embed_audio(files)
    table = {f"{kind}": audio[(i + 2) % len(KINDS)] for i, kind in enumerate(KINDS)}  # a scrambled answer
    monkeypatch.setattr(Clap, "embed_text", lambda self, texts, batch_size=64: np.stack([table[t] for t in texts]))
    summary = json_out(clap("eval", "zeroshot", "--data", tmp_path / "multi.jsonl", "--labels", ",".join(KINDS),
                            "--template", "{}", "--model", tiny_model_dir, "--device", "cpu", "--json"))
    hot = np.array([[1.0 if KINDS[j] in r["labels"] else 0.0 for j in range(len(KINDS))] for r in rows])
    text = np.stack([table[k] for k in KINDS])
    assert summary["metrics"]["mAP"] == pytest.approx(multilabel_map(audio @ text.T, hot), abs=1e-6)
    assert summary["metrics"]["mAP"] != pytest.approx(multilabel_map(audio @ text.T, np.eye(len(KINDS))), abs=1e-6)
