"""Issue 19, "output that cannot be forged or crash", through the real CLI on a tiny random model: file names
holding a newline, an escape sequence or rich markup (`a\\nb.wav`, `e\\x1b[31m.wav`, `x[/].wav`) in `clap
search --paths` / `-0`, in tables, in skip messages and in the one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap, runner
from clapcli.cli import output
from clapcli.cli.main import app
from entry_point import clap_executable

NAMES = ["x[/].wav", "a\nb.wav", "e\x1b[31m.wav", "[bold]plain.wav"]  # x[/].wav: the file "].wav" in folder "x["


@pytest.fixture(scope="module")
def odd_library(tmp_path_factory, tiny_model_dir):
    """Four clips, three with hostile names, indexed once: (folder, index dir, the clips' paths)."""
    root = tmp_path_factory.mktemp("odd").resolve() / "lib"
    (root / "x[").mkdir(parents=True)
    paths = [write_audio(root / name, tone_noise(1.0, 16_000, seed=i), 16_000) for i, name in enumerate(NAMES)]
    index_dir = root.parent / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--workers", "0")
    return root, index_dir, paths


def on_a_terminal(monkeypatch) -> None:
    """What a person at a wide terminal gets (tables, not JSON lines); CliRunner's stdout is a pipe. No colours,
    so any escape sequence in the output came from a name."""
    from rich.console import Console

    monkeypatch.setattr(output, "is_terminal", lambda: True)
    for name, stderr in (("stdout_console", False), ("stderr_console", True)):
        monkeypatch.setattr(output, name, lambda stderr=stderr: Console(stderr=stderr, force_terminal=True,
                                                                         color_system=None, width=300))


def test_null_separated_paths_are_the_exact_names(odd_library):
    _, index_dir, paths = odd_library
    result = clap("search", "rain", "--index", index_dir, "-0", "-k", "10")
    printed = result.stdout_bytes.split(b"\0")
    assert printed[-1] == b""  # every entry ends with NUL
    assert sorted(printed[:-1]) == sorted(os.fsencode(p) for p in paths)
    assert all(os.path.isfile(p) for p in printed[:-1])
    assert result.stderr == ""
    assert clap("search", "rain", "--index", index_dir, "--paths", "--null", "-k", "10").stdout_bytes \
        == result.stdout_bytes


def test_paths_cannot_be_forged_by_a_newline_in_a_name(odd_library):
    _, index_dir, paths = odd_library
    result = clap("search", "rain", "--index", index_dir, "--paths", "-k", "10")
    lines = result.stdout.splitlines()
    assert len(lines) == len(NAMES)  # one line per file: the newline did not make two
    root = odd_library[0]
    assert sorted(lines) == sorted(os.path.join(root, n) for n in ["x[/].wav", "a\\nb.wav", "e\\x1b[31m.wav",
                                                                        "[bold]plain.wav"])
    assert "\x1b" not in result.stdout
    assert "2 path(s) hold control characters" in result.stderr and "-0" in result.stderr


def test_paths_from_stdin_queries_with_null(odd_library):
    _, index_dir, paths = odd_library
    result = runner.invoke(app, ["search", "--stdin", "--index", str(index_dir), "-0", "-k", "10"],
                           input="rain\ndog\n")
    assert result.exit_code == 0, result.output
    first, second, rest = result.stdout_bytes.split(b"\0\0")
    assert rest == b""
    for answer in (first, second):
        assert sorted(answer.split(b"\0")) == sorted(os.fsencode(p) for p in paths)


def test_json_and_null_are_one_or_the_other(odd_library):
    _, index_dir, _ = odd_library
    result = runner.invoke(app, ["search", "rain", "--index", str(index_dir), "-0", "--json"])
    assert result.exit_code != 0 and "choose one of --json and -0" in str(result.exception)


def test_search_table_shows_names_literally_with_controls_escaped(odd_library, monkeypatch):
    _, index_dir, _ = odd_library
    on_a_terminal(monkeypatch)
    result = clap("search", "rain [bold]", "--index", index_dir, "--not", "[/]", "-k", "10")
    text = result.stdout
    # the name first ("].wav" in the folder "x["), its folder under it
    assert "│ ].wav " in text and "│ x[ " in text and "e\\x1b[31m.wav" in text and "a\\nb.wav" in text
    assert "[bold]plain.wav" in text
    assert "rain [bold]" in text and "(not: [/])" in text
    assert "\x1b" not in text


def test_embed_missing_file_named_like_markup_says_it_is_missing(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for terminal in (False, True):
        if terminal:
            on_a_terminal(monkeypatch)
        result = runner.invoke(app, ["embed", "x[/].wav", "e\x1b[31m.wav", "--model", str(tiny_model_dir)])
        assert result.exit_code == 1, (result.output, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "skipped: x[/].wav:" in result.stderr
        assert "skipped: e\\x1b[31m.wav:" in result.stderr
        assert "\x1b" not in result.output and "MarkupError" not in result.output


def test_embed_table_and_out_message_show_names_literally(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "x[").mkdir()
    clip = write_audio(tmp_path / "x[/]e\x1b[31m.wav", tone_noise(1.0, 16_000), 16_000)
    on_a_terminal(monkeypatch)
    text = clap("embed", clip, "--text", "[red]", "--model", tiny_model_dir).stdout
    assert "x[/]e\\x1b[31m.wav" in text and "[red]" in text and "\x1b" not in text
    out_dir = tmp_path / "[b]out"
    out_dir.mkdir()
    result = clap("embed", clip, "--model", tiny_model_dir, "--out", out_dir / "v.npy")
    assert f"to {out_dir / 'v.npy'}" in result.stderr


def test_tag_shows_paths_and_labels_literally(tiny_model_dir, tmp_path, monkeypatch):
    (tmp_path / "x[").mkdir()
    clip = write_audio(tmp_path / "x[/].wav", tone_noise(1.0, 16_000), 16_000)
    on_a_terminal(monkeypatch)
    (tmp_path / "gone\x1b[2J.wav").write_bytes(b"not audio")  # a missing one is refused before the model loads
    result = runner.invoke(app, ["tag", clip, str(tmp_path / "gone\x1b[2J.wav"), "--labels", "[/]dog,e\x1b[31mcat",
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "x[/].wav" in result.stdout and "[/]dog" in result.stdout and "e\\x1b[31mcat" in result.stdout
    assert "gone\\x1b[2J.wav" in result.stderr
    assert "\x1b" not in result.output


def test_index_summary_and_list_show_names_literally(tiny_model_dir, tmp_path, monkeypatch):
    lib = tmp_path / "lib"
    lib.mkdir()
    write_audio(lib / "ok.wav", tone_noise(1.0, 16_000), 16_000)
    (lib / "broken[").mkdir()
    (lib / "broken[/]\x1b[31m.wav").write_bytes(b"not audio")
    on_a_terminal(monkeypatch)
    result = clap("index", lib, "--index", "[b]odd", "--model", tiny_model_dir, "--workers", "0")
    assert "[b]odd" in result.stderr and "broken[/]\\x1b[31m.wav" in result.stderr
    assert "\x1b" not in result.stderr
    assert "[b]odd" in clap("index", "list").stdout


def test_errors_escape_control_characters_and_keep_markup_text(tmp_path):
    """Through the installed entry point, whose error handler prints the one-line message."""
    env = dict(os.environ, CLAP_HOME=str(tmp_path / "home"))
    missing = str(tmp_path / "e\x1b[31m[/]")
    done = subprocess.run([clap_executable(), "search", "rain", "--index", missing], env=env, capture_output=True,
                          timeout=120)
    err = done.stderr.decode()
    assert done.returncode != 0
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "e\\x1b[31m[/]" in err and "\x1b" not in err


def test_escape_controls_names_every_control_character():
    assert output.display_path("a\nb\tc\rd\x00e\x7ff\x9bg") == "a\\nb\\tc\\rd\\x00e\\x7ff\\x9bg"
    assert output.literal("x[/].wav") == "x\\[/].wav"
    assert output.display_path(Path("plain/é.wav")) == "plain/é.wav"
    assert json.loads(output.json_text({"path": "a\nb"}))["path"] == "a\nb"  # JSON keeps the exact name
