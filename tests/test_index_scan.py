"""The recursive scan that finds candidate audio files for `clap index`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from clapcli.index import scan as scan_mod
from clapcli.index.scan import ScanEntry, ScanProblem, scan


def _touch(path: Path, data: bytes = b"RIFF....WAVE") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _paths(entries) -> list[str]:
    return [str(e.path) for e in entries]


@pytest.fixture
def library(tmp_path) -> Path:
    root = tmp_path / "lib"
    _touch(root / "kick.wav", b"x" * 10)
    _touch(root / "drums" / "snare.FLAC")
    _touch(root / "drums" / "toms" / "floor.aiff")
    _touch(root / "drums" / "toms" / "deep" / "deeper" / "rack.ogg")
    _touch(root / "fx" / "rise.mp3")
    _touch(root / "fx" / "notes.txt")  # not an audio extension
    _touch(root / "fx" / "fake.wav", b"just some text, not audio")  # decoding decides, not the scan
    _touch(root / ".hidden" / "secret.opus")
    _touch(root / "README")
    return root


def test_nested_directories_sorted_absolute_with_stat(library):
    problems: list[ScanProblem] = []
    entries = list(scan([library], problems=problems))
    assert _paths(entries) == sorted(
        str(library / p)
        for p in [
            "kick.wav", "drums/snare.FLAC", "drums/toms/floor.aiff", "drums/toms/deep/deeper/rack.ogg",
            "fx/rise.mp3", "fx/fake.wav", ".hidden/secret.opus",
        ]
    )
    assert problems == []
    kick = next(e for e in entries if e.path.name == "kick.wav")
    st = (library / "kick.wav").stat()
    assert kick == ScanEntry(library / "kick.wav", 10, st.st_mtime_ns)
    assert all(e.path.is_absolute() for e in entries)
    assert list(scan([library])) == entries  # deterministic


def test_relative_roots_and_explicit_files(library, monkeypatch, tmp_path):
    monkeypatch.chdir(library)
    entries = list(scan(["drums/toms", "notes-and-audio.bin", "fx/notes.txt"], problems=(problems := [])))
    assert _paths(entries) == [
        str(library / "drums/toms/deep/deeper/rack.ogg"),
        str(library / "drums/toms/floor.aiff"),
        str(library / "fx/notes.txt"),  # named explicitly: taken whatever its extension
    ]
    assert problems == [ScanProblem(library / "notes-and-audio.bin", "no such file or directory")]


def test_symlink_loops_are_detected_and_linked_dirs_followed(library, tmp_path):
    (library / "drums" / "loop").symlink_to(library)  # points back to an ancestor
    (library / "fx" / "self").symlink_to(".")  # points to itself
    elsewhere = tmp_path / "elsewhere"
    _touch(elsewhere / "pad.wav")
    (library / "linked").symlink_to(elsewhere)
    (library / "alias.wav").symlink_to(library / "kick.wav")
    (library / "broken.wav").symlink_to(tmp_path / "does-not-exist.wav")
    problems: list[ScanProblem] = []
    entries = list(scan([library, elsewhere], problems=problems))
    paths = _paths(entries)
    assert str(elsewhere / "pad.wav") in paths  # resolved path of a file reached through a linked dir
    assert paths.count(str(library / "kick.wav")) == 1 and not any("alias" in p for p in paths)
    assert len(paths) == len(set(paths)) == 8
    reasons = {(p.path.name, p.reason) for p in problems}
    assert ("loop", "symbolic link loop (points back to a parent directory)") in reasons
    assert ("self", "symbolic link loop (points back to a parent directory)") in reasons
    assert ("broken.wav", "broken symbolic link") in reasons
    assert len(problems) == 3


def test_exclude_globs_match_names_relative_and_absolute_paths(library):
    _touch(library / ".git" / "objects" / "blob.wav")
    _touch(library / "drafts" / "take1.wav")
    _touch(library / "archive" / "old" / "v1.wav")
    _touch(library / "fx" / "render.tmp.wav")
    entries = list(scan([library], exclude=[".git", "*.tmp.wav", "drafts/*", "*/old/*", ".hidden"]))
    paths = _paths(entries)
    assert not any(s in p for p in paths for s in [".git", "render.tmp", "drafts", "/old/", ".hidden"])
    assert str(library / "kick.wav") in paths and str(library / "fx" / "rise.mp3") in paths
    assert len(paths) == 6


def test_unreadable_directory_and_file_are_reported_not_fatal(library, monkeypatch):
    real_scandir, real_access = os.scandir, os.access
    blocked_dir, blocked_file = library / "drums", str(library / "fx" / "rise.mp3")

    def scandir(path):
        if Path(path) == blocked_dir:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    monkeypatch.setattr(scan_mod.os, "access", lambda p, mode: p != blocked_file and real_access(p, mode))
    problems: list[ScanProblem] = []
    paths = _paths(scan([library], problems=problems))
    assert problems == [
        ScanProblem(blocked_dir, "cannot read directory: permission denied", unread_dir=True),
        ScanProblem(library / "fx" / "rise.mp3", "permission denied", unread=True),
    ]
    assert str(library / "kick.wav") in paths and not any("drums" in p or "rise" in p for p in paths)


def test_chmod_000_directory_and_file(library):
    (library / "drums").chmod(0)
    (library / "kick.wav").chmod(0)
    try:
        problems: list[ScanProblem] = []
        paths = _paths(scan([library], problems=problems))
        assert str(library / "fx" / "rise.mp3") in paths  # the rest of the tree is still scanned
        if os.geteuid() == 0:
            pytest.skip("running as root: chmod 000 does not block reads (covered by the monkeypatched test)")
        assert {(p.path.name, p.reason) for p in problems} == {
            ("drums", "cannot read directory: permission denied"), ("kick.wav", "permission denied"),
        }
        assert not any("drums" in p or "kick" in p for p in paths)
    finally:
        (library / "drums").chmod(0o755)
        (library / "kick.wav").chmod(0o644)


def test_known_audio_extensions():
    for ext in ["wav", "wave", "flac", "ogg", "oga", "opus", "mp3", "aif", "aiff", "aifc", "au", "snd", "caf",
                "w64", "rf64"]:
        assert ext in scan_mod.AUDIO_EXTENSIONS
    assert "txt" not in scan_mod.AUDIO_EXTENSIONS and "" not in scan_mod.AUDIO_EXTENSIONS
