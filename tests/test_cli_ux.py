"""Issue 18, "the commands as users write them", through the real CLI: how `clap search` reads its words, an
audio file given as the query, the search table at 80 columns, `clap tag` on folders, "did you mean" for
indexes and `clap index lst`, `--debug` after the command, empty `--not`/`--text`, output polish (plurals,
one time format, summaries not wrapped off a terminal, a merged `--timeline`) and `clap tag | head`."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap, fails
from clapcli.cli import options, output
from entry_point import clap_executable


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def no_model(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(options, "load", refuse)


def unit(v):
    return (np.asarray(v, np.float32) / np.linalg.norm(v)).astype(np.float32)


# -- clap search: the words are one query ------------------------------------------------------------------

E = np.eye(4, dtype=np.float32)
IDENTITY = {"model": "fake", "weights_sha256": "0" * 64, "dim": 4}


class WordsModel:
    """Stands in for a loaded model (the environment, not what is tested): each text embeds as a chosen vector,
    so the query the CLI built can be read back from the scores."""

    identity_dict = IDENTITY
    vectors = {"metal impact": E[0], "metal": E[1], "impact": E[2], "glass": E[3], "rain": unit(E[1] + E[3])}

    def embed_text(self, texts, cache=False):
        return np.stack([self.vectors[t] for t in texts])


@pytest.fixture
def words_index(tmp_path, monkeypatch):
    from clapcli.index.store import IndexStore

    files = {"impact.wav": E[0], "metal_and_impact.wav": unit(E[1] + E[2]), "glass.wav": E[3]}
    index_dir = tmp_path / "idx"
    with IndexStore.open(index_dir, create=True) as store:
        store.set_model_identity(IDENTITY)
        store.add_roots(["/lib"])
        for name, vector in files.items():
            store.upsert_file(f"/lib/sfx/{name}", 1, 1, name, 1.0, 48_000, 1, [(0.0, 1.0, "file", vector)])
    monkeypatch.setattr(options, "load", lambda *args, **kwargs: WordsModel())
    return index_dir, files


def test_words_after_search_are_one_query_and_json_says_how_it_was_read(words_index):
    index_dir, files = words_index
    quoted = json_lines(clap("search", "metal impact", "--index", index_dir, "--json").stdout)
    unquoted = json_lines(clap("search", "metal", "impact", "--index", index_dir, "--json").stdout)
    assert unquoted == quoted  # as in every search box
    assert Path(unquoted[0]["path"]).name == "impact.wav"
    assert unquoted[0]["query"] == {"text": ["metal impact"], "not": [], "audio": [], "not_audio": []}


def test_a_lone_plus_adds_a_query_and_a_lone_minus_pushes_one_away(words_index):
    index_dir, files = words_index
    hits = json_lines(clap("search", "metal", "impact", "+", "glass", "-", "rain", "--index", index_dir,
                           "--json").stdout)
    assert hits[0]["query"] == {"text": ["metal impact", "glass"], "not": ["rain"], "audio": [], "not_audio": []}
    q = unit(E[0] + E[3] - WordsModel.vectors["rain"])
    for h in hits:
        assert h["score"] == pytest.approx(float(files[Path(h["path"]).name] @ q), abs=1e-5)
    same = json_lines(clap("search", "metal impact", "+", "glass", "--not", "rain", "--index", index_dir,
                           "--json").stdout)
    assert [(h["path"], h["score"]) for h in same] == [(h["path"], h["score"]) for h in hits]


def test_empty_not_and_lone_operators_are_refused_with_what_is_wrong(tmp_path, monkeypatch):
    no_model(monkeypatch)
    fails("search", "rain", "--not", "", code=2, match="empty --not")
    fails("search", "rain", "-n", "  ", code=2, match="empty --not")
    fails("search", "rain", "+", code=2, match="a lone + or - joins two queries")
    fails("search", "-", "rain", code=2, match="a lone + or - joins two queries")
    fails("search", "", code=2, match="empty query")


def test_search_table_at_80_columns_shows_names_whole_and_folders_relative_to_the_root(monkeypatch):
    from rich.console import Console

    from clapcli.cli.search import _table
    from clapcli.index.search import Hit

    root = "/home/someone/Sample Libraries"
    deep = f"{root}/Foley/Impacts/Metal/Heavy/Take 3 (close mic)"
    hits = [Hit(1, 0.4321, f"{deep}/funkyrobot_metal_impact_hard_03.wav", 173.4, 175.9, 1200.0),
            Hit(2, 0.1563, f"{root}/kick.flac", None, None, 0.156)]
    buffer = io.StringIO()
    monkeypatch.setattr(output, "stdout_console",
                        lambda: Console(file=buffer, width=80, force_terminal=False, color_system=None))
    _table(hits, "metal impact", [], roots=[root])
    text = buffer.getvalue()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert any("funkyrobot_metal_impact_hard_03.wav" in line for line in lines)  # whole, extension kept
    name_line = next(i for i, line in enumerate(lines) if "funkyrobot" in line)
    assert "Foley/Impacts" in lines[name_line + 1]  # the folder under the name, relative to the indexed root…
    assert "Sample Libraries/Foley" not in text and f"folders relative to {root}" in text  # …which is named once
    assert "kick.flac" in text
    assert "2:53.40–2:55.90" in text and "20:00.00" in text and "0:00.16" in text  # one way to write times


def test_missing_named_index_suggests_the_close_one_and_lists_them(tmp_path, clap_home, monkeypatch):
    from clapcli.index.store import IndexStore

    for name in ("takes", "sfx"):
        with IndexStore.open(clap_home / "indexes" / name, create=True) as store:
            store.set_model_identity(IDENTITY)
    no_model(monkeypatch)
    monkeypatch.delenv("CLAP_INDEX", raising=False)
    text = fails("search", "tone", "--index", "take", code=1, match="did you mean takes?")
    assert "the indexes are: sfx, takes" in text and "no index at" in text
    for where in (["--index", "zzz"], []):  # no close name; no default index
        text = fails("search", "tone", *where, code=1, match="the indexes are: sfx, takes")
        assert "did you mean" not in text


def test_index_with_a_mistyped_subcommand_says_did_you_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    no_model(monkeypatch)
    fails("index", "lst", code=2, match="did you mean `clap index list`?")
    fails("index", "lsit", code=2, match="did you mean `clap index list`?")
    text = fails("index", "lib", code=1, match="no such file or directory")  # a folder that is not there
    assert "did you mean" not in text


# -- real audio on the tiny model ------------------------------------------------------------------------


def write_clips(folder: Path, names, seconds: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(write_audio(folder / n, tone_noise(seconds, 16_000, seed=i), 16_000)) for i, n in enumerate(names)]


def test_an_audio_file_as_the_query_searches_by_example_and_says_so(tiny_model_dir, tmp_path):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    clips = write_clips(lib / "sfx", ["laser1.wav", "laser2.wav", "boom.wav"])
    clap("index", lib, "--index", idx, "--model", tiny_model_dir, "--workers", "0")
    result = clap("search", clips[0], "--index", idx, "--json", "--include-self")
    hits = json_lines(result.stdout)
    assert hits[0]["path"] == str(clips[0].resolve()) and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert hits[0]["query"] == {"text": [], "not": [], "audio": [str(clips[0])], "not_audio": []}
    assert "searching by example" in result.stderr and "laser1.wav is an audio file" in result.stderr


def test_index_summary_reads_as_finished_and_is_not_wrapped_in_a_log(tiny_model_dir, tmp_path):
    lib = tmp_path / "a-rather-long-folder-name-for-the-sample-library-so-that-lines-pass-80-columns"
    write_clips(lib, ["one.wav"], seconds=2.5)
    result = clap("index", lib, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--workers", "0")
    lines = result.stderr.splitlines()
    first = next(line for line in lines if "added" in line)
    assert "0:02.50 of audio at" in first and "real time" in first  # one line, whatever the width
    assert " h of audio" not in result.stderr
    assert any(line.startswith("now 1 file, 1 segment;") for line in lines)


def test_index_summary_names_the_files_whose_previous_embeddings_were_kept(capsys):
    from clapcli.cli.index import _print_summary
    from clapcli.index.summary import IndexSummary

    summary = IndexSummary("idx", "m", total_files=1, seconds=1.0, kept_previous=[("/lib/x[/].wav", "no space left")])
    _print_summary(summary)  # this line used a name that was never imported (NameError)
    err = capsys.readouterr().err
    assert "kept previous embeddings /lib/x[/].wav: its new version failed (no space left)" in err


def test_tag_walks_folders_as_index_does(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_clips(tmp_path / "lib" / "sfx", ["b.wav", "a.flac"])
    write_clips(tmp_path / "lib" / "sfx" / "deeper", ["c.wav"])
    (tmp_path / "lib" / "sfx" / "notes.txt").write_text("not audio, not tried")
    rows = json_lines(clap("tag", "lib/sfx", "--labels", "dog,rain", "--model", tiny_model_dir, "--json").stdout)
    assert [r["path"] for r in rows] == ["lib/sfx/a.flac", "lib/sfx/b.wav", "lib/sfx/deeper/c.wav"]
    assert all(len(r["labels"]) == 2 and "error" not in r for r in rows)


def test_tag_checks_every_path_before_loading_the_model(tmp_path, monkeypatch):
    (clip,) = write_clips(tmp_path, ["clip.wav"])
    (tmp_path / "empty").mkdir()
    no_model(monkeypatch)
    fails("tag", clip, tmp_path / "missing.wav", "--labels", "esc50", code=2, match="missing.wav: no such file")
    fails("tag", tmp_path / "empty", "--labels", "esc50", code=2, match="no audio files in this folder")


def test_tag_progress_moves_inside_a_long_file(tiny_model_dir, tmp_path):
    """The bar's hook hears about a 25 s file's audio before the file is done, and the bar moves by it."""
    import sys

    from clapcli.engine.load import load_model
    from clapcli.tagging import resolve_labels, tag_files

    (long,) = write_clips(tmp_path, ["take.wav"], seconds=25.0)
    heard = []
    results = list(tag_files(load_model(str(tiny_model_dir), device="cpu"), [long], resolve_labels("dog,rain"),
                             on_audio=lambda path, seconds, expected: heard.append((path, seconds, expected))))
    assert results[0].error is None
    assert len(heard) > 1 and heard[0][0] == str(long) and heard[0][1] < heard[0][2] == pytest.approx(25.0)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stderr, sys.stderr = sys.stderr, Terminal()
    try:
        bar = output.ProgressBar("tagging", 1, within_files=True).start()
        bar.on_audio(str(long), 10.0, 25.0)
        assert bar._bar.tasks[0].completed == pytest.approx(0.4)
        bar.on_audio(str(long), 20.0, 25.0)
        assert bar._bar.tasks[0].completed == pytest.approx(0.99)  # the last part moves when the file is done
        bar.advance(path=str(long))
        assert bar._bar.tasks[0].completed == pytest.approx(1.0)
        bar.stop()
    finally:
        sys.stderr = stderr


def test_timeline_merges_neighbouring_windows_with_the_same_labels():
    from rich.console import Console

    from clapcli.cli.tag import print_tables
    from clapcli.tagging.tag import FileTags, LabelScore, WindowTags

    def window(start, label, prob):
        return WindowTags(start, start + 10.0, [LabelScore(label, prob, 0.1)])

    timeline = [window(0.0, "rain", 0.8), window(10.0, "rain", 0.6), window(20.0, "thunder", 0.9),
                window(30.0, "rain", 0.7), window(35.0, "rain", 0.5)]
    result = FileTags("/x/take.wav", 45.0, [LabelScore("rain", 0.7, 0.2)], timeline)
    buffer = io.StringIO()
    print_tables(Console(file=buffer, width=80, force_terminal=False, color_system=None), result)
    text = buffer.getvalue()
    rows = [line for line in text.splitlines() if "–" in line]
    assert len(rows) == 3
    assert "0:00.00–0:20.00" in rows[0] and "rain (0.70)" in rows[0]
    assert "0:20.00–0:30.00" in rows[1] and "thunder (0.90)" in rows[1]
    assert "0:30.00–0:45.00" in rows[2] and "rain (0.60)" in rows[2]
    assert "/x/take.wav (0:45.00)" in text


def test_embed_table_writes_lengths_in_the_one_time_format(tiny_model_dir, tmp_path, monkeypatch):
    from rich.console import Console

    (clip,) = write_clips(tmp_path, ["clip.wav"], seconds=1.5)
    monkeypatch.setattr(output, "is_terminal", lambda: True)
    monkeypatch.setattr(output, "stdout_console", lambda: Console(width=200, force_terminal=True, color_system=None))
    text = clap("embed", clip, "--text", "rain", "--model", tiny_model_dir).stdout
    assert "0:01.50" in text and "1.5 " not in text


def test_embed_refuses_empty_text_like_search(monkeypatch):
    no_model(monkeypatch)
    fails("embed", "--text", "", code=2, match="empty --text")
    fails("embed", "--text", "dog", "--text", " ", code=2, match="empty --text")


def test_help_says_window_not_10_s_and_names_no_extra_for_the_engine():
    """onnxruntime is a core dependency: --engine's help names no extra to install (it once said "when clapcli
    is installed", rich having eaten `[onnx]`)."""
    for command in ("tag", "embed", "search", "index"):
        text = " ".join(clap(command, "--help").stdout.replace("│", " ").split())
        assert "10 s window" not in text, command
        assert "clapcli is installed" not in text and "extra" not in text, command
    assert "auto (onnxruntime for --precision int8" in " ".join(clap("search", "--help").stdout.replace("│", " ").split())


# -- through the installed entry point ---------------------------------------------------------------------


def test_debug_is_accepted_after_the_command(tmp_path):
    env = dict(os.environ, CLAP_HOME=str(tmp_path / "home"))
    done = subprocess.run([clap_executable(), "search", "rain", "--index", tmp_path / "none", "--debug"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "No such option" not in done.stderr
    assert "Traceback" in done.stderr and "error: no index at" in done.stderr


def test_tag_into_a_closed_pipe_exits_0(tiny_model_dir, tmp_path):
    clips = write_clips(tmp_path / "lib", [f"{i:02d}.wav" for i in range(30)])
    proc = subprocess.Popen([clap_executable(), "tag", *clips, "--labels", "dog,rain", "--model", tiny_model_dir,
                             "--batch-size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()  # `| head -1`: read one line, then close the pipe
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert json.loads(first)["path"].endswith("00.wav")
    assert "error" not in err and "Traceback" not in err and "Exception ignored" not in err
