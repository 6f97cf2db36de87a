"""Issue #11, "consistent, expected behaviour", through the real CLI on a tiny random model: `clap index list`
and `rm`, `clap --version`, search's early checks, single custom labels, non-UTF-8 file names in `--json`, a
moved model directory, 80-column tables and `--exclude` on a later run."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap, fails, runner
from clapcli.cli import index_admin
from clapcli.cli.main import app


def clap_with_input(*args, input: str):
    result = runner.invoke(app, [str(a) for a in args], input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def write_clips(folder: Path, names, seconds: float = 1.0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(write_audio(folder / n, tone_noise(seconds, 16_000, seed=i), 16_000)) for i, n in enumerate(names)]


# -- clap index list / rm ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sfx_snapshot(tiny_model_dir, tmp_path_factory):
    """Index a folder literally named `list` once per module as "sfx", from inside its parent folder:
    (the run's JSON summary, a copy of the index directory). Tests restore the copy into their own CLAP_HOME."""
    base = tmp_path_factory.mktemp("sfx")
    write_clips(base / "list", ["a.wav", "b.wav"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(base / "clap-home"))  # isolated as conftest's per-test clap_home, not active yet
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("CLAP_MODEL", raising=False)
        mp.chdir(base)
        summary = json_lines(clap("index", "list", "--index", "sfx", "--model", tiny_model_dir, "--json").stdout)[-1]
    shutil.copytree(base / "clap-home" / "indexes" / "sfx", base / "snapshot")
    return summary, base / "snapshot"


@pytest.fixture
def sfx_index(sfx_snapshot, clap_home, tmp_path, monkeypatch) -> Path:
    """The named index "sfx" of two files in this test's CLAP_HOME, with the working directory elsewhere."""
    index_dir = clap_home / "indexes" / "sfx"
    shutil.copytree(sfx_snapshot[1], index_dir)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return index_dir


def test_index_of_a_folder_named_list_indexes_it_rather_than_listing(sfx_snapshot):
    # A folder literally named `list` is indexed, not listed: an existing path wins over the subcommand.
    summary, _ = sfx_snapshot
    assert summary["added"] == 2


def test_index_list_reports_name_path_files_model_and_size(sfx_index, tiny_model_dir):
    index_dir = sfx_index
    rows = json_lines(clap("index", "list", "--json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "sfx" and row["path"] == str(index_dir) and row["files"] == 2
    assert row["model"] == str(Path(tiny_model_dir).resolve()) and row["error"] is None
    on_disk = sum(f.stat().st_size for f in index_dir.rglob("*") if f.is_file())
    assert 0 < row["size_bytes"] and abs(row["size_bytes"] - on_disk) < 1 << 16


def test_index_rm_off_a_terminal_without_yes_is_refused(sfx_index):
    index_dir = sfx_index
    # Not on a terminal and without --yes: refused, nothing removed.
    fails("index", "rm", "sfx", code=2, match="pass --yes")
    assert (index_dir / "index.sqlite").is_file()


def test_index_rm_on_a_terminal_asks_and_n_keeps_the_index(sfx_index, monkeypatch):
    index_dir = sfx_index
    # On a terminal it asks; "n" keeps the index.
    monkeypatch.setattr(index_admin, "_stdin_is_terminal", lambda: True)
    fails("index", "rm", "sfx", code=1, match="nothing removed", input="n\n")
    assert (index_dir / "index.sqlite").is_file()


def test_index_rm_while_the_writer_lock_is_held_is_refused_even_with_yes(sfx_index, monkeypatch):
    from clapcli.index.lock import WriterLock

    index_dir = sfx_index
    monkeypatch.setattr(index_admin, "_stdin_is_terminal", lambda: True)
    # While `clap index` holds the writer lock: refused, even with --yes.
    with WriterLock(index_dir):
        locked = fails("index", "rm", "sfx", "--yes", code=1, match="being written")
        fails("index", "rm", "sfx", code=1, match="being written", input="n\n")  # refused before asking
    assert f"pid {os.getpid()}" in locked
    assert (index_dir / "index.sqlite").is_file()


def test_index_rm_confirmed_removes_the_index_from_disk_and_from_the_list(sfx_index, monkeypatch):
    index_dir = sfx_index
    monkeypatch.setattr(index_admin, "_stdin_is_terminal", lambda: True)
    removed = clap_with_input("index", "rm", "sfx", input="y\n")
    assert "removed index sfx" in removed.output and "2 files" in removed.output
    assert not index_dir.exists()
    assert json_lines(clap("index", "list", "--json").stdout) == []


def test_index_rm_of_an_index_that_does_not_exist_says_so():
    fails("index", "rm", "sfx", "--yes", code=1, match="no index 'sfx'")


def test_index_rm_of_a_directory_index_keeps_other_files(tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    write_clips(lib, ["a.wav"])
    index_dir = lib / "my-index"  # an index inside the user's own folder: only the index's files may go
    clap("index", lib, "--index", index_dir, "--model", tiny_model_dir)
    (index_dir / "notes.txt").write_text("mine")
    (index_dir / ".partitions" / "run-1").mkdir(parents=True)  # what a killed sharded run leaves behind
    clap("index", "rm", index_dir, "--yes")
    assert sorted(p.name for p in index_dir.iterdir()) == ["notes.txt"]
    assert (lib / "a.wav").is_file()


def test_help_lists_the_index_subcommands_and_version_is_fast():
    helptext = " ".join(clap("--help").stdout.replace("│", " ").split())  # as read, across wrapped lines
    assert "index list" in helptext and "index rm" in helptext
    assert "list" in clap("index", "list", "--help").stdout
    for flag in ("--version", "-V"):
        assert clap(flag).stdout.strip() == f"clap {version('clapcli')}"
    script = ("import sys; sys.argv = ['clap', '--version']\nfrom clapcli.cli.main import main\n"
              "try:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
              "print('torch' in sys.modules, 'numpy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"clap {version('clapcli')}", "False False"]


# -- clap search: checks before the model ----------------------------------------------------------------------


def test_search_checks_audio_and_empty_queries_before_anything_else(tmp_path, monkeypatch):
    from clapcli.cli import options

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(options, "load", no_model)
    # No index exists either: the argument errors come first, as usage errors (exit 2).
    cases = [
        (["--audio", tmp_path / "missing.wav"], "no such file"),
        (["--audio", tmp_path], "not a file"),
        (["   "], "empty query"),
        (["rain", "--not", "\t"], "empty --not"),
    ]
    for args, message in cases:
        fails("search", *args, code=2, match=message)


# -- clap tag --labels ---------------------------------------------------------------------------------------


def test_tag_with_a_single_custom_label(tiny_model_dir, tmp_path):
    (clip,) = write_clips(tmp_path, ["clip.wav"])
    for labels, expected in (("dog", ["dog"]), ("dog,cat", ["cat", "dog"])):
        (row,) = json_lines(clap("tag", clip, "--labels", labels, "--model", tiny_model_dir, "--json").stdout)
        assert sorted(s["label"] for s in row["labels"]) == expected
    (row,) = json_lines(clap("tag", clip, "--labels", "dog", "--model", tiny_model_dir, "--json").stdout)
    assert row["labels"][0]["prob"] == pytest.approx(1.0) and -1 <= row["labels"][0]["cosine"] <= 1
    fails("tag", clip, "--labels", "esc-50", "--model", tiny_model_dir, code=2, match="did you mean esc50?")


def test_label_resolution_rules():
    from clapcli.tagging.labels import LabelSetError, resolve_labels

    assert resolve_labels("siren").labels == ["siren"]
    assert resolve_labels(" church bells ").labels == ["church bells"]
    assert len(resolve_labels("ESC50")) == 50
    for near, name in (("esc-50", "esc50"), ("Audio Set", "audioset"), ("urbansound", "urbansound8k"),
                       ("fsd50", "fsd50k")):
        with pytest.raises(LabelSetError, match=f"did you mean {name}"):
            resolve_labels(near)


# -- non-UTF-8 file names in --json ------------------------------------------------------------------------


def test_file_names_that_are_not_utf8_carry_path_bytes(tiny_model_dir, tmp_path):
    lib = tmp_path / "lib"
    write_clips(lib, ["a.wav", "b.wav"])
    (plain,) = write_clips(tmp_path / "odd", ["plain.wav"])
    raw = os.path.join(os.fsencode(tmp_path / "odd"), b"caf\xe9-\xff.wav")  # Latin-1 bytes: not UTF-8
    os.rename(os.fsencode(plain), raw)
    shutil.copy(raw, os.path.join(os.fsencode(lib), b"caf\xe9-\xff.wav"))
    name = os.fsdecode(raw)  # what the program sees in argv: the bad bytes as lone surrogates

    def check(entry, raw_path: bytes):
        assert entry["path_bytes"] == raw_path.hex()
        assert bytes.fromhex(entry["path_bytes"]) == raw_path
        assert entry["path"] == raw_path.decode("utf-8", "replace") and "\ufffd" in entry["path"]

    def run(*args):
        result = clap(*args)
        text = result.stdout_bytes.decode("utf-8")  # strictly valid UTF-8
        return json_lines(text)

    summary = run("index", lib, "--index", tmp_path / "idx", "--model", tiny_model_dir, "--json")[-1]
    (skipped,) = summary["skipped_files"]
    assert "not valid UTF-8" in skipped["reason"]
    check(skipped, os.path.join(os.fsencode(lib.resolve()), b"caf\xe9-\xff.wav"))

    (tagged,) = run("tag", name, "--labels", "dog,cat", "--model", tiny_model_dir, "--json")
    check(tagged, raw)
    assert "error" not in tagged and len(tagged["labels"]) == 2  # the file itself is read, too

    (embedded,) = run("embed", name, "--model", tiny_model_dir, "--json")
    check(embedded, raw)
    assert "error" not in embedded and len(embedded["embedding"]) > 0

    hits = run("search", "--audio", name, "--index", tmp_path / "idx", "--json")  # as a query by example
    assert len(hits) == 2 and all("path_bytes" not in h for h in hits)


def test_portable_json_keeps_good_names_and_numbers_as_they_are():
    from clapcli.cli.output import portable

    good = {"path": "/tmp/naïve.wav", "embedding": [0.5, -1.0], "nested": [{"path": "/a\udcffb", "x": 1}]}
    out = portable(good)
    assert out["path"] == "/tmp/naïve.wav" and "path_bytes" not in out and out["embedding"] == [0.5, -1.0]
    assert out["nested"][0] == {"path": "/a\ufffdb", "path_bytes": b"/a\xffb".hex(), "x": 1}


# -- a moved model directory; search's mismatch message ---------------------------------------------------


def test_moved_model_and_model_mismatch_messages(tiny_model_dir, tiny_unfused_dir, tmp_path):
    old, new = tmp_path / "models" / "mine", tmp_path / "models" / "moved"
    shutil.copytree(tiny_model_dir, old)
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    write_clips(lib, ["a.wav", "b.wav"])
    clap("index", lib, "--index", idx, "--model", old)
    old.rename(new)

    lost = fails("search", "rain", "--index", idx, code=1, match=f"model at {old}, which no longer exists")
    assert "--model NEW_PATH" in lost
    write_clips(lib, ["c.wav"], seconds=1.5)  # something new (not a copy of a.wav): `clap index` needs the model
    lost = fails("index", lib, "--index", idx, code=1, match=f"model at {old}, which no longer exists")
    assert "--model NEW_PATH" in lost

    assert len(json_lines(clap("search", "rain", "--index", idx, "--model", new, "--json").stdout)) == 2
    clap("index", lib, "--index", idx, "--model", new)  # records the new place
    assert len(json_lines(clap("search", "rain", "--index", idx, "--json").stdout)) == 3

    other = fails("search", "rain", "--index", idx, "--model", tiny_unfused_dir, code=1, match="was built with model")
    assert "pass the same --model or --rebuild" not in other  # `search` has no --rebuild
    assert "search without --model" in other and "`clap index DIR…" in other

    shutil.rmtree(new)
    shutil.copytree(tiny_unfused_dir, new)  # other weights at the remembered place, and no --model given
    changed = fails("search", "rain", "--index", idx, code=1, match=f"the weights at {new} have changed")
    assert "search without --model" not in changed and "--model PATH" in changed


# -- 80-column tables ----------------------------------------------------------------------------------------


def render(print_to) -> str:
    from rich.console import Console

    buffer = io.StringIO()
    print_to(Console(file=buffer, width=80, force_terminal=False, color_system=None))
    return buffer.getvalue()


def test_models_table_keeps_every_name_whole_at_80_columns():
    from clapcli.cli.models import models_table
    from clapcli.models.registry import KNOWN_MODELS

    rows = [{"name": m.name, "architecture": m.architecture, "fused": m.fused, "dim": m.dim, "cached": False,
             "default": False, "note": m.note} for m in KNOWN_MODELS.values()]
    text = render(lambda con: con.print(models_table(rows)))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    for m in KNOWN_MODELS.values():
        assert any(m.name in line for line in lines), m.name
    assert "…" not in text


def test_index_list_prints_long_paths_whole_at_80_columns():
    model = "/srv/shared/models/clap/finetuned/game-sound-effects-2026-11-30/final-checkpoint-step-12000"
    rows = [{"name": "sfx", "path": "/home/someone/.local/share/clap/indexes/sfx", "files": 1234,
             "size_bytes": 56_700_000, "model": model, "error": None}]
    lines = render(lambda con: index_admin.print_index_list(con, rows)).splitlines()
    assert lines[0].split() == ["sfx", "1234", "files,", "56.7", "MB"]
    assert any(model in line for line in lines) and any(rows[0]["path"] in line for line in lines)


def test_tag_table_prints_a_long_path_whole_at_80_columns():
    from clapcli.cli.tag import print_tables
    from clapcli.tagging.tag import FileTags, LabelScore, WindowTags

    path = "/home/someone/Sample Libraries/Field recordings/2023-05-17_forest_dawn_chorus_with_traffic_take_03.wav"
    labels = [LabelScore("Chirp, tweet of a small songbird", 0.5, 0.2), LabelScore("dog", 0.3, 0.1)]
    result = FileTags(path, 35.0, labels, [WindowTags(0.0, 10.0, labels)])
    lines = render(lambda con: print_tables(con, result)).splitlines()
    assert any(path in line for line in lines)
    assert all(len(line) <= 80 for line in lines if path not in line)
    assert any("Chirp, tweet of a small songbird" in line for line in lines)


# -- --exclude on a later run ------------------------------------------------------------------------------


def test_exclude_on_a_later_run_removes_indexed_matches_and_says_so(tiny_model_dir, tmp_path):
    lib, idx = tmp_path / "lib", tmp_path / "idx"
    write_clips(lib, ["keep.wav", "take.tmp.wav"])
    write_clips(lib / "drafts", ["d.wav"])
    assert json_lines(clap("index", lib, "--index", idx, "--model", tiny_model_dir, "--json").stdout)[-1]["added"] == 3
    summary = json_lines(clap("index", lib, "--index", idx, "--exclude", "drafts", "--json").stdout)[-1]
    assert summary["removed"] == 1 and summary["removed_excluded"] == 1 and summary["total_files"] == 2
    result = clap("index", lib, "--index", idx, "--exclude", "drafts", "--exclude", "*.tmp.wav")
    assert "1 removed (1 excluded)" in result.output
    paths = [h["path"] for h in json_lines(clap("search", "rain", "--index", idx, "--json").stdout)]
    assert paths == [str((lib / "keep.wav").resolve())]
