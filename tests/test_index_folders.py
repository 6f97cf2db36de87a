"""Issue #19, "nothing lost, round two", through the real CLI on a tiny random model: `clap index rm` deletes
only the index's own files, an index remembers its folders (refresh, --rebuild, --forget), an emptied folder
at any depth prunes nothing, and a file that cannot be read this run keeps its embeddings."""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli.index import scan as scan_mod
from library import stored, summary


def clips(folder: Path, *names: str) -> list[Path]:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_audio(folder / name, tone_noise(0.5, 16_000, seed=len(str(folder)) + i), 16_000)
    return [(folder / n).resolve() for n in names]


# -- clap index rm -----------------------------------------------------------------------------------------


def test_rm_of_a_named_index_that_is_a_symlink_deletes_only_the_index_files(tiny_model_dir, tmp_path, clap_home):
    shared = tmp_path / "shared"  # the user's own folder, which the named index links to
    mine = clips(shared, "take_01.wav", "drafts/take_02.wav")
    (shared / "notes.txt").write_text("mine")
    (clap_home / "indexes").mkdir(parents=True)
    link = clap_home / "indexes" / "sfx"
    link.symlink_to(shared, target_is_directory=True)
    lib = tmp_path / "lib"
    clips(lib, "a.wav")
    clap("index", lib, "--index", "sfx", "--model", tiny_model_dir)
    assert (shared / "index.sqlite").is_file()

    result = clap("index", "rm", "sfx", "--yes")
    assert not os.path.lexists(link)  # the link went
    assert all(p.is_file() for p in mine) and (shared / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in shared.iterdir()) == ["drafts", "notes.txt", "take_01.wav"]
    assert f"kept {shared.resolve()}" in result.output.replace("\n", "")


# -- an index remembers its folders --------------------------------------------------------------------------


@dataclass
class RememberedLib:
    a: Path  # two clips
    b: Path  # one clip, or two once refreshed
    index_dir: Path  # the named index "lib", built from a and b


@pytest.fixture(scope="module")
def remembered_lib_snapshots(tiny_model_dir, tmp_path_factory):
    """Index a and b once per module as "lib" and keep two snapshots of the folders and the index: "built"
    (three clips) and "refreshed" (after b gained four.wav). Tests restore one and may then change it."""
    base = tmp_path_factory.mktemp("remembered")
    a, b, home = base / "a", base / "b", base / "clap-home"
    clips(a, "one.wav", "two.wav")
    clips(b, "three.wav")

    def snapshot(name):
        shutil.copytree(a, base / name / "a")
        shutil.copytree(b, base / name / "b")
        shutil.copytree(home / "indexes" / "lib", base / name / "lib")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(home))  # isolated as conftest's per-test clap_home, not active yet
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("CLAP_MODEL", raising=False)
        clap("index", a, b, "--index", "lib", "--model", tiny_model_dir)
        snapshot("built")
        clips(b, "four.wav")
        clap("index", "--index", "lib")
        snapshot("refreshed")
    return base


def _restore(base: Path, name: str, clap_home: Path) -> RememberedLib:
    a, b, index_dir = base / "a", base / "b", clap_home / "indexes" / "lib"
    for folder in (a, b):
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base / name / folder.name, folder)  # copy2 keeps mtimes: the index sees no change
    shutil.copytree(base / name / "lib", index_dir)
    return RememberedLib(a, b, index_dir)


@pytest.fixture
def built_lib(remembered_lib_snapshots, clap_home) -> RememberedLib:
    return _restore(remembered_lib_snapshots, "built", clap_home)


@pytest.fixture
def refreshed_lib(remembered_lib_snapshots, clap_home) -> RememberedLib:
    return _restore(remembered_lib_snapshots, "refreshed", clap_home)


def test_an_index_lists_the_folders_it_was_built_from(built_lib):
    a, b = built_lib.a, built_lib.b
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["roots"] == [str(a.resolve()), str(b.resolve())]


def test_a_rebuild_of_some_remembered_folders_is_refused_naming_the_others(built_lib):
    a, b, index_dir = built_lib.a, built_lib.b, built_lib.index_dir
    before = stored(index_dir)
    # A rebuild of A alone would drop B's files: refused, naming B and how to drop it on purpose.
    result = clap("index", a, "--index", "lib", "--rebuild", ok=False)
    message = str(result.exception)
    assert result.exit_code == 1 and str(b.resolve()) in message and f"--forget {b.resolve()}" in message
    assert stored(index_dir) == before


def test_an_index_run_without_folders_refreshes_every_remembered_folder(built_lib):
    clips(built_lib.b, "four.wav")  # the same seed as three.wav: a copy, given its vectors (issue #20)
    s = summary(clap("index", "--index", "lib", "--json"))
    assert s["copied"] == 1 and s["removed"] == 0 and s["total_files"] == 4


def test_a_remembered_folder_that_is_gone_prunes_nothing_without_prune_empty(refreshed_lib, tmp_path):
    b, index_dir = refreshed_lib.b, refreshed_lib.index_dir
    # A remembered folder that is gone (an unmounted drive) prunes nothing without --prune-empty.
    b.rename(tmp_path / "b-away")
    result = clap("index", "--index", "lib", "--json", ok=False)
    assert result.exit_code == 1 and "--prune-empty" in str(result.exception)
    assert summary(result)["removed"] == 0 and len(stored(index_dir)) == 4


def test_a_rebuild_without_folders_rebuilds_every_remembered_folder(refreshed_lib):
    s = summary(clap("index", "--index", "lib", "--rebuild", "--json"))  # no folder: all of them
    assert s["added"] == 4 and s["total_files"] == 4


def test_forget_drops_a_folders_files_from_the_index_and_keeps_the_folder(refreshed_lib):
    a, b, index_dir = refreshed_lib.a, refreshed_lib.b, refreshed_lib.index_dir
    s = summary(clap("index", "--index", "lib", "--forget", b, "--json"))
    assert s["forgotten"] == [{"path": str(b.resolve()), "removed_files": 2}] and s["total_files"] == 2
    assert sorted(stored(index_dir)) == [str(p) for p in sorted(a.resolve().iterdir())]
    assert (b / "three.wav").is_file()
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["roots"] == [str(a.resolve())]
    s = summary(clap("index", a, "--index", "lib", "--rebuild", "--json"))
    assert s["total_files"] == 2


def test_forget_of_a_folder_the_index_does_not_have_names_the_ones_it_has(built_lib, tmp_path):
    a = built_lib.a
    result = clap("index", "--index", "lib", "--forget", tmp_path / "elsewhere", ok=False)
    assert result.exception.exit_code == 2 and str(a.resolve()) in str(result.exception)


def test_an_index_run_without_folders_on_a_new_index_asks_for_them():
    result = clap("index", "--index", "new", ok=False)  # nothing to refresh
    assert result.exception.exit_code == 2 and "name the folders" in str(result.exception)


# -- an emptied folder at any depth ---------------------------------------------------------------------------


def test_an_empty_mount_point_inside_a_root_prunes_nothing(tiny_model_dir, tmp_path):
    lib, index_dir = tmp_path / "music", tmp_path / "idx"
    nas = lib / "NAS"
    clips(nas, "x.wav", "y.wav", "deep/z.wav")
    clips(lib, "local.wav")
    clap("index", lib, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)

    shutil.rmtree(nas)  # the share is unmounted: its mount point lists nothing
    nas.mkdir()
    result = clap("index", lib, "--index", index_dir, "--json", ok=False)
    assert result.exit_code == 1 and str(nas.resolve()) in str(result.exception)
    s = summary(result)
    assert s["removed"] == 0 and s["emptied_roots"] == [{"path": str(nas.resolve()), "kept_files": 3}]
    assert stored(index_dir) == before
    result = clap("index", lib, "--index", index_dir, "--rebuild", ok=False)
    assert result.exit_code == 1 and "--prune-empty" in str(result.exception)
    assert stored(index_dir) == before

    s = summary(clap("index", lib, "--index", index_dir, "--json", "--prune-empty"))
    assert s["removed"] == 3 and s["total_files"] == 1


# -- a file that cannot be read this run ----------------------------------------------------------------------


class _UnstatableEntry:
    """A directory entry whose stat fails the way a flaky network share fails."""

    def __init__(self, entry):
        self.name = entry.name
        self._entry = entry

    def is_symlink(self) -> bool:
        return self._entry.is_symlink()

    def stat(self, follow_symlinks: bool = True):
        raise OSError(errno.EIO, "Input/output error", self.name)


def test_a_file_that_cannot_be_read_this_run_keeps_its_embeddings(tiny_model_dir, tmp_path, monkeypatch):
    lib, index_dir = tmp_path / "lib", tmp_path / "idx"
    flaky, locked, fine = clips(lib, "flaky.wav", "locked.wav", "fine.wav")
    clap("index", lib, "--index", index_dir, "--model", tiny_model_dir)
    before = stored(index_dir)
    real_scandir, real_access = os.scandir, os.access

    @contextmanager
    def scandir(path):
        with real_scandir(path) as it:
            yield [_UnstatableEntry(e) if e.name == flaky.name else e for e in it]

    monkeypatch.setattr(scan_mod.os, "scandir", scandir)
    monkeypatch.setattr(scan_mod.os, "access", lambda p, mode: p != str(locked) and real_access(p, mode))
    s = summary(clap("index", lib, "--index", index_dir, "--json"))
    assert s["removed"] == 0 and s["total_files"] == 3
    assert s["kept_unreadable"] == [{"path": str(flaky), "reason": "Input/output error"},
                                    {"path": str(locked), "reason": "permission denied"}]
    assert stored(index_dir) == before
    result = clap("index", lib, "--index", index_dir, "--rebuild", ok=False)  # would lose them: refused
    assert result.exit_code == 1 and str(locked) in str(result.exception) and "refused" in str(result.exception)
    assert stored(index_dir) == before

    monkeypatch.undo()  # readable again: nothing to redo
    s = summary(clap("index", lib, "--index", index_dir, "--json"))
    assert s["unchanged"] == 3 and s["added"] == s["removed"] == 0 and s["kept_unreadable"] == []


def test_schema_3_migration_and_nested_roots(tmp_path, monkeypatch):
    from clapcli.index import schema as schema_mod
    from clapcli.index.store import IndexStore

    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS[:2])
    with IndexStore.open(tmp_path / "v2", create=True) as s:
        s.set_meta("dim", "4")
    monkeypatch.undo()
    with IndexStore.open(tmp_path / "v2") as s:  # an index from before: it knows no folders yet
        assert s.get_meta("schema_version") == str(len(schema_mod.MIGRATIONS)) and s.roots() == []
        s.add_roots(["/m/a", "/m/b"])
        s.add_roots(["/m/a/inner", "/m/ab"])  # inside a remembered folder: nothing new; a sibling: added
        assert s.roots() == ["/m/a", "/m/ab", "/m/b"]
        s.add_roots(["/m"])  # the folders inside it give way
        assert s.roots() == ["/m"]
        s.forget_roots(["/m"])
        assert s.roots() == []
