"""`clap tag` end to end, through the real `clap` app (typer's CliRunner) and the installed entry point.

The option checks and `--list-labelsets` need no model; the CSV stream is checked row by row on hand-built
results; everything else tags synthesised audio with the tiny random model of `conftest.tiny_model_dir`.
Nothing here skips: a broken import of the model core fails these tests.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
from typer.testing import CliRunner

from clapcli.cli.main import app as clap_app
from clapcli.errors import ClapError
from clapcli.tagging import CSV_HEADER, FileTags, LabelScore, WindowTags, builtin_labelsets
from entry_point import clap_executable

runner = CliRunner()


@pytest.fixture
def app():
    return clap_app


@pytest.fixture
def model_dir(tiny_model_dir):
    return str(tiny_model_dir)


@pytest.fixture
def audio_files(tmp_path):
    """A 3 s and a 25 s synthesised file (48 kHz mono) and a file that is not audio."""
    return _write_audio_files(tmp_path)


def _write_audio_files(tmp_path: Path):
    rng = np.random.default_rng(0)
    sr = 48_000
    short = tmp_path / "beep.wav"
    t = np.arange(3 * sr) / sr
    soundfile.write(short, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr)
    long = tmp_path / "noise.flac"
    soundfile.write(long, (0.1 * rng.standard_normal(25 * sr)).astype(np.float32), sr)
    bad = tmp_path / "notes.wav"
    bad.write_text("this is not audio")
    return short, long, bad


def invoke(app, *args):
    return runner.invoke(app, ["tag", *map(str, args)])


# ---------------------------------------------------------------- no model needed


def test_list_labelsets_prints_names_and_sizes(app):
    result = invoke(app, "--list-labelsets")
    assert result.exit_code == 0, result.output
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert lines == [["esc50", "50"], ["urbansound8k", "10"], ["audioset", "527"], ["fsd50k", "200"],
                     ["vggsound", "309"]]
    as_json = [json.loads(line) for line in invoke(app, "--list-labelsets", "--json").stdout.splitlines()]
    assert as_json[2] == {"name": "audioset", "size": 527}


@pytest.mark.parametrize(
    "args, message",
    [
        (["x.wav", "--labels", "esc50", "--json", "--csv"], "cannot be used together"),
        (["x.wav", "--labels", "audioset", "--multi-label"], "needs --threshold"),
        (["x.wav"], "choose a label set with --labels"),
        (["--labels", "esc50"], "at least one audio file"),
        (["x.wav", "--labels", "esc50", "--threshold", "1.5"], "not a probability in [0, 1]"),
        (["x.wav", "--labels", "esc50", "--multi-label", "--threshold", "-2"], "not a cosine in [-1, 1]"),
        (["x.wav", "--labels", "esc-50"], "unknown label set 'esc-50'"),
        (["x.wav", "--labels", "dog,rain", "--template", "no slot here"], "exactly one"),
    ],
)
def test_usage_errors_are_clap_errors_with_exit_code_2(app, args, message):
    # The command raises; `clap`'s main turns a ClapError into one line and its exit code (checked below).
    result = invoke(app, *args)
    assert isinstance(result.exception, ClapError), result.output
    assert result.exception.exit_code == 2
    assert message in str(result.exception)


def test_unknown_labelset_message_lists_the_builtin_sets(app):
    message = str(invoke(app, "x.wav", "--labels", "esc-50").exception)
    for name, size in builtin_labelsets().items():
        assert f"{name} ({size})" in message


def test_top_must_be_positive(app):
    result = invoke(app, "x.wav", "--labels", "esc50", "--top", "0")
    assert result.exit_code == 2
    assert "--top" in result.output


def run_clap(*args):
    return subprocess.run([clap_executable(), *map(str, args)], capture_output=True, text=True, env=os.environ.copy())


def test_entry_point_reports_a_usage_error_in_one_line_with_exit_code_2():
    proc = run_clap("tag", "x.wav", "--labels", "esc-50")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "unknown label set 'esc-50'" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_entry_point_lists_labelsets():
    proc = run_clap("tag", "--list-labelsets")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2] == "audioset\t527"


def test_importing_the_command_does_not_import_torch_or_numpy():
    code = "import sys, clapcli.cli.tag; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- the --csv stream, on hand-built results


def test_csv_stream_has_the_header_then_one_row_per_file_label_and_window_label(app, monkeypatch, tmp_path):
    """The rows `clap tag --csv` writes, parsed back with the csv module: file-level rows with empty
    start/end, then that file's window rows; a label with a comma stays one field; a failed file has none."""
    import clapcli.tagging
    from clapcli.cli import options

    results = [
        FileTags("a b.wav", 25.0, [LabelScore("dog", 0.75, 0.31), LabelScore("rain, heavy", 0.25, 0.2)],
                 [WindowTags(0.0, 10.0, [LabelScore("dog", 0.9, 0.33)]),
                  WindowTags(10.0, 20.0, [LabelScore("rain, heavy", 0.6, 0.25)]),
                  WindowTags(15.0, 25.0, [LabelScore("dog", 0.55, 0.29)])]),
        FileTags("bad.wav", None, [], None, "no such file"),
        FileTags("c.wav", 3.5, [LabelScore("siren", 1.0, 0.5)]),
    ]
    monkeypatch.setattr(options, "load", lambda *args, **kwargs: object())
    monkeypatch.setattr(clapcli.tagging, "tag_files", lambda model, files, *args, **kwargs: iter(results))
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\nrain, heavy\nsiren\n")
    monkeypatch.chdir(tmp_path)
    for name in ("a b.wav", "bad.wav", "c.wav"):  # the paths are checked before the (faked) tagging
        Path(name).touch()
    result = invoke(app, "a b.wav", "bad.wav", "c.wav", "--labels", f"@{labels}", "--csv", "--timeline")
    assert result.exit_code == 1, result.output  # one file failed
    reader = csv.reader(io.StringIO(result.stdout))
    assert tuple(next(reader)) == CSV_HEADER == ("path", "label", "prob", "cosine", "start", "end")
    assert list(reader) == [
        ["a b.wav", "dog", "0.75", "0.31", "", ""],
        ["a b.wav", "rain, heavy", "0.25", "0.2", "", ""],
        ["a b.wav", "dog", "0.9", "0.33", "0.0", "10.0"],
        ["a b.wav", "rain, heavy", "0.6", "0.25", "10.0", "20.0"],
        ["a b.wav", "dog", "0.55", "0.29", "15.0", "25.0"],
        ["c.wav", "siren", "1.0", "0.5", "", ""],
    ]
    assert "skipped: bad.wav: no such file" in result.stderr


# ---------------------------------------------------------------- with the tiny model


@pytest.fixture(scope="module")
def esc50_timeline(tiny_model_dir, tmp_path_factory):
    """`clap tag` of the 3 s and the 25 s file with all 50 ESC-50 labels, --json --timeline, run once per
    module: (short, long, the JSON records)."""
    short, long, _ = _write_audio_files(tmp_path_factory.mktemp("esc50-timeline"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(short.parent / "clap-home"))  # isolated as conftest's per-test clap_home
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("CLAP_MODEL", raising=False)
        result = invoke(clap_app, short, long, "--labels", "esc50", "--top", "50", "--json", "--timeline",
                        "--model", str(tiny_model_dir), "--device", "cpu")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return short, long, records


def test_json_has_one_record_per_file_in_order(esc50_timeline):
    short, long, records = esc50_timeline
    assert [r["path"] for r in records] == [str(short), str(long)]


def test_json_file_labels_are_all_top_k_with_probabilities_summing_to_one_best_first(esc50_timeline):
    _, _, records = esc50_timeline
    for record in records:
        assert "error" not in record
        assert len(record["labels"]) == 50
        assert sum(label["prob"] for label in record["labels"]) == pytest.approx(1.0, abs=1e-4)
        probs = [label["prob"] for label in record["labels"]]
        assert probs == sorted(probs, reverse=True)


def test_json_timeline_of_a_short_file_is_empty(esc50_timeline):
    _, _, records = esc50_timeline
    assert records[0]["duration"] == pytest.approx(3.0, abs=0.01)
    assert records[0]["timeline"] == []  # ≤ 10 s: no windows, the file-level labels stand alone


def test_json_timeline_of_a_long_file_covers_it_with_10_s_windows_whose_probabilities_sum_to_one(esc50_timeline):
    _, _, records = esc50_timeline
    windows = records[1]["timeline"]
    assert len(windows) >= 3
    assert windows[0]["start"] == 0.0
    assert windows[-1]["end"] == pytest.approx(records[1]["duration"], abs=0.01)
    for before, after in zip(windows, windows[1:]):
        assert after["start"] <= before["end"] + 1e-6  # no gap: the windows cover the file
    for window in windows:
        assert window["end"] - window["start"] == pytest.approx(10.0, abs=0.01)
        assert sum(label["prob"] for label in window["labels"]) == pytest.approx(1.0, abs=1e-4)


def test_cosines_match_a_hand_computation_with_the_library(app, model_dir, audio_files):
    from clapcli.engine.load import load_model
    from clapcli.tagging import label_embeddings, render

    short, _, _ = audio_files
    labels = ["dog", "rain", "siren", "engine idling"]
    templates = ["This is a sound of {}.", "the sound of {}"]
    result = invoke(app, short, "--labels", ",".join(labels), "--top", "4", "--json", "--model", model_dir,
                    "--device", "cpu", "--template", templates[0], "--template", templates[1])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    model = load_model(model_dir, device="cpu")
    audio = model.embed_audio([str(short)])[0]  # (D,)
    label_emb = label_embeddings(model.embed_text(render(templates, labels)), 2, 4)  # (4, D)
    cosine = label_emb @ audio
    probs = np.exp(model.logit_scale * cosine) / np.exp(model.logit_scale * cosine).sum()
    got = {entry["label"]: entry for entry in record["labels"]}
    for i, label in enumerate(labels):
        assert got[label]["cosine"] == pytest.approx(float(cosine[i]), abs=1e-4)
        assert got[label]["prob"] == pytest.approx(float(probs[i]), abs=1e-4)


def test_second_run_uses_cached_label_embeddings(app, model_dir, audio_files, monkeypatch):
    import clapcli.engine.load

    short, _, _ = audio_files
    text_calls = []
    real_load_model = clapcli.engine.load.load_model

    def counting_load_model(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        real_embed_text = model.embed_text

        def embed_text(texts, *a, **k):
            text_calls.append(len(texts))
            return real_embed_text(texts, *a, **k)

        model.embed_text = embed_text
        return model

    monkeypatch.setattr(clapcli.engine.load, "load_model", counting_load_model)
    args = [short, "--labels", "urbansound8k", "--json", "--model", model_dir, "--device", "cpu"]
    first = invoke(app, *args)
    assert first.exit_code == 0, first.output
    assert text_calls and sum(text_calls) == 10
    text_calls.clear()
    second = invoke(app, *args)
    assert second.exit_code == 0, second.output
    assert text_calls == []  # no text-tower call
    assert json.loads(second.stdout) == json.loads(first.stdout)
    assert list((Path(os.environ["CLAP_HOME"]) / "label-cache").glob("*.npy"))


def test_csv_rows_per_file_label_and_window(app, model_dir, audio_files):
    short, long, _ = audio_files
    result = invoke(app, short, long, "--labels", "esc50", "--top", "3", "--csv", "--timeline",
                    "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert list(rows[0]) == ["path", "label", "prob", "cosine", "start", "end"]
    file_rows = [r for r in rows if r["start"] == ""]
    window_rows = [r for r in rows if r["start"] != ""]
    assert [r["path"] for r in file_rows] == [str(short)] * 3 + [str(long)] * 3
    # 25 s → windows 0–10, 10–20, 15–25, three labels each; the 3 s file has no window rows
    assert {r["path"] for r in window_rows} == {str(long)}
    assert [(r["start"], r["end"]) for r in window_rows[::3]] == [("0.0", "10.0"), ("10.0", "20.0"), ("15.0", "25.0")]
    assert all(0.0 <= float(r["prob"]) <= 1.0 and -1.0 <= float(r["cosine"]) <= 1.0 for r in rows)


def test_bad_file_is_reported_and_skipped_with_exit_code_1(app, model_dir, audio_files):
    short, long, bad = audio_files  # a missing path is refused before the model loads: test_cli_ux.py
    result = invoke(app, short, bad, long, "--labels", "esc50", "--json", "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["path"] for r in records] == [str(short), str(bad), str(long)]
    assert "error" not in records[0] and "error" not in records[2]
    assert records[1]["error"] and records[1]["labels"] == []
    assert not records[1]["error"].startswith(str(bad))  # the reason alone; the path has its own key
    assert f"skipped: {bad}:" in result.stderr


def test_multi_label_threshold_on_cosine(app, model_dir, audio_files):
    short, _, _ = audio_files
    base = [short, "--labels", "fsd50k", "--json", "--model", model_dir, "--device", "cpu", "--multi-label"]
    everything = json.loads(invoke(app, *base, "--threshold", "-1").stdout)
    assert len(everything["labels"]) == 200  # every cosine is ≥ -1
    cut = float(np.median([label["cosine"] for label in everything["labels"]]))
    some = json.loads(invoke(app, *base, "--threshold", str(cut)).stdout)
    assert 0 < len(some["labels"]) < 200
    assert all(label["cosine"] >= cut - 1e-6 for label in some["labels"])


def test_entry_point_tags_a_file_and_exits_0(model_dir, audio_files):
    short, _, _ = audio_files
    proc = run_clap("tag", short, "--labels", "dog,rain", "--json", "--model", model_dir, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert {label["label"] for label in record["labels"]} == {"dog", "rain"}


def test_entry_point_exits_1_when_a_file_fails(model_dir, audio_files):
    short, _, bad = audio_files
    proc = run_clap("tag", short, bad, "--labels", "dog,rain", "--model", model_dir, "--device", "cpu")
    assert proc.returncode == 1, proc.stderr
    assert [json.loads(line)["path"] for line in proc.stdout.splitlines()] == [str(short), str(bad)]
    assert f"skipped: {bad}:" in proc.stderr


def test_piped_output_defaults_to_json_lines(app, model_dir, audio_files):
    short, _, _ = audio_files
    result = invoke(app, short, "--labels", "dog,rain,siren", "--model", model_dir, "--device", "cpu")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)  # CliRunner's stdout is not a terminal: one JSON object, no table
    assert record["path"] == str(short)
    assert sorted(label["label"] for label in record["labels"]) == ["dog", "rain", "siren"]
