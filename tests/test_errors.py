"""One error vocabulary: usage errors exit 2 in every command, runtime failures 1, an interrupt 130."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clapcli.cli import main as cli_main
from clapcli.cli.output import report_exception
from clapcli.errors import ClapError, DataError, IndexStoreError, TrainingError, UsageError
from clapcli.tagging import LabelSetError, TemplateError
from entry_point import clap_executable


def run_main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """Run `clap ARGS` through the real entry function (error reporting included): (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["clap", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        cli_main.main()
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed"], "nothing to embed"),
        (["embed", "--text", "x", "--out", "e.txt"], "--out must end in .npy"),
        (["embed", "--text", "x", "--out", "no/such/dir/e.npy"], "--out: no such directory"),
        (["search"], "nothing to search for"),
        (["search", "rain", "--json", "--paths"], "choose one of --json and --paths"),
        (["search", "rain", "--index", ""], "empty index name"),
        (["tag", "x.wav", "--labels", "@missing.txt"], "label file not found"),
        (["tag", "x.wav", "--labels", "dog,rain", "--template", "no slot"], "exactly one"),
        (["tag", "x.wav"], "choose a label set"),
        (["embed", "--text", "x", "--precision", "fp16"], "unknown precision 'fp16'"),
        (["embed", "--text", "x", "--device", "quantum"], "unknown device 'quantum'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == 2, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_missing_model_is_a_runtime_error_exit_1(monkeypatch, capsys, tmp_path):
    code, err = run_main(monkeypatch, capsys, "embed", "--text", "rain", "--model", tmp_path / "no-model",
                         "--device", "cpu")
    assert code == 1, err
    assert f"no such checkpoint file or directory: {tmp_path / 'no-model'}" in err and "Traceback" not in err


def test_a_missing_index_is_a_runtime_error_exit_1(monkeypatch, capsys, tmp_path):
    code, err = run_main(monkeypatch, capsys, "search", "rain", "--index", tmp_path / "nothing-here")
    assert code == 1, err
    assert "no index at" in err


def test_the_installed_entry_point_exits_2_on_a_usage_error(tmp_path):
    for args in (["embed"], ["search", "q", "--json", "--paths"]):
        proc = subprocess.run([clap_executable(), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr and proc.stdout == ""


def test_exit_codes_of_the_vocabulary():
    assert report_exception(UsageError("u")) == 2
    assert report_exception(LabelSetError("l")) == 2 and report_exception(TemplateError("t")) == 2
    assert report_exception(ClapError("c")) == 1 and report_exception(IndexStoreError("i")) == 1
    assert report_exception(DataError("d")) == 1 and report_exception(TrainingError("t")) == 1
    assert report_exception(KeyboardInterrupt()) == 130
    assert report_exception(RuntimeError("boom")) == 1


def test_label_template_and_tag_errors_are_usage_errors():
    assert issubclass(LabelSetError, UsageError) and issubclass(TemplateError, UsageError)
    assert not issubclass(DataError, UsageError) and not issubclass(TrainingError, UsageError)


def test_data_error_names_the_shard_and_member():
    err = DataError("no caption", source="train/000003.tar", member="clip_0042")
    assert str(err) == "train/000003.tar: clip_0042: no caption"
    assert (err.reason, err.source, err.member) == ("no caption", "train/000003.tar", "clip_0042")
    assert str(DataError("sizes.json lists 5 shards, found 4", source="shards/")) == (
        "shards/: sizes.json lists 5 shards, found 4"
    )


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no message")


@pytest.mark.parametrize("exc, line", [
    (OSError("disk full\nsecond line"), "disk full"),
    (ValueError("\n  \n  bad header  \ndetail"), "bad header"),  # the first line with words, stripped
    (EOFError(), "EOFError"),  # an empty message names the type (splitlines()[0] raised IndexError here)
    (RuntimeError("   "), "RuntimeError"),
    (_Unprintable(), "_Unprintable"),  # a broken __str__ does not replace the error being reported
])
def test_first_line_of_an_exception_never_raises(exc, line):
    from clapcli.errors import first_line

    assert first_line(exc) == line


def test_a_checkpoint_error_with_an_empty_message_still_reports_one_line(tmp_path, monkeypatch, capsys):
    """torch.load failing with an empty EOFError (a truncated file) used to end in IndexError from the
    hand-written `str(exc).splitlines()[0]`; now the message names the exception type."""
    import torch

    path = tmp_path / "truncated.pt"
    path.write_bytes(b"")

    def truncated(*args, **kwargs):
        raise EOFError()

    monkeypatch.setattr(torch, "load", truncated)
    code, err = run_main(monkeypatch, capsys, "embed", "--text", "rain", "--model", path)
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"cannot read {path} as a torch checkpoint: EOFError" in err
