"""Where clap keeps its files (`clapcli.home`) and how it writes them (`clapcli.atomic`)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from clapcli.atomic import atomic_directory, atomic_write, remove_stale_temps, temp_path, write_npy
from clapcli.home import cache_dir, clap_home
from clapcli.index.paths import indexes_dir, resolve_index
from clapcli.tagging.cache import label_cache_dir

# ---------------------------------------------------------------- home


def test_clap_home_overrides_the_data_and_cache_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAP_HOME", str(tmp_path / "h"))
    assert clap_home() == cache_dir() == tmp_path / "h"
    assert resolve_index(None) == indexes_dir() / "default" == tmp_path / "h" / "indexes" / "default"
    assert label_cache_dir() == tmp_path / "h" / "label-cache"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("CLAP_HOME", "~/clap")
    assert clap_home() == tmp_path / "user" / "clap"


def test_without_clap_home_the_user_dirs_are_used(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.setenv("CLAP_HOME", "")  # empty counts as unset
    assert clap_home() == Path(platformdirs.user_data_dir("clap"))
    monkeypatch.delenv("CLAP_HOME")
    assert cache_dir() == Path(platformdirs.user_cache_dir("clap"))
    assert label_cache_dir() == Path(platformdirs.user_cache_dir("clap")) / "label-cache"
    assert resolve_index("drums") == Path(platformdirs.user_data_dir("clap")) / "indexes" / "drums"


def test_home_is_the_only_reader_of_clap_home_and_platformdirs():
    package = Path(__file__).resolve().parent.parent / "clapcli"
    readers = sorted(
        str(p.relative_to(package))
        for p in package.rglob("*.py")
        if re.search(r"environ(\.get)?[\[(]\s*['\"]CLAP_HOME|getenv\(\s*['\"]CLAP_HOME|platformdirs", p.read_text())
    )
    assert readers == ["home.py"]


# ---------------------------------------------------------------- atomic files


def test_write_npy_keeps_the_name_and_never_pickles(tmp_path):
    target = tmp_path / "vectors.npy"
    matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_npy(target, matrix) == target
    np.testing.assert_array_equal(np.load(target, allow_pickle=False), matrix)
    assert os.listdir(tmp_path) == ["vectors.npy"]  # np.save given a path would have written "<temp>.npy"
    with pytest.raises(ValueError):
        write_npy(target, np.array([{"a": 1}], dtype=object))  # object arrays would need a pickle
    np.testing.assert_array_equal(np.load(target), matrix)  # the old file stays, no temporary is left
    assert os.listdir(tmp_path) == ["vectors.npy"]


def test_atomic_write_bytes_and_text_replace_the_file(tmp_path):
    target = tmp_path / "a.json"
    atomic_write(target, b"old")
    assert atomic_write(target, "néw") == target
    assert target.read_text(encoding="utf-8") == "néw"
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_new_file_gets_the_umask_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x", b"1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o644


@pytest.mark.parametrize("error", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "vectors.hnsw"
    target.write_bytes(b"the old graph")

    def half_then_fail(path: Path) -> None:
        path.write_bytes(b"half a gra")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, writer=half_then_fail)
    assert target.read_bytes() == b"the old graph"
    assert os.listdir(tmp_path) == ["vectors.hnsw"]


def test_a_writer_gets_a_temporary_beside_the_target_and_its_file_lands(tmp_path):
    seen = []

    def save(path: Path) -> None:
        seen.append(path)
        with open(path, "wb") as f:
            np.save(f, np.arange(4, dtype=np.float32))

    atomic_write(tmp_path / "e.npy", writer=save)
    assert seen[0].parent == tmp_path and seen[0].name != "e.npy"
    assert np.array_equal(np.load(tmp_path / "e.npy"), np.arange(4, dtype=np.float32))
    assert os.listdir(tmp_path) == ["e.npy"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    (tmp_path / "t").write_bytes(b"keep")
    with pytest.raises(OSError, match="wrote no file"):
        atomic_write(tmp_path / "t", writer=lambda path: None)
    assert (tmp_path / "t").read_bytes() == b"keep"


def test_exactly_one_of_data_and_writer(tmp_path):
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "t")
    with pytest.raises(TypeError):
        atomic_write(tmp_path / "t", b"x", writer=lambda p: None)
    assert not (tmp_path / "t").exists()


def test_remove_stale_temps_removes_only_that_files_temporaries(tmp_path):
    target = tmp_path / "vectors.hnsw"
    stale = [temp_path(target), temp_path(target)]
    for p in stale:
        p.write_bytes(b"killed mid-save")
    keep = [target, temp_path(tmp_path / "vectors.hnsw.json"), tmp_path / "vectors.hnsw.bak.tmp"]
    for p in keep:
        p.write_bytes(b"x")
    assert remove_stale_temps(target) == 2
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)


# ---------------------------------------------------------------- atomic directories


def test_atomic_directory_appears_only_when_complete(tmp_path):
    target = tmp_path / "step-100"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.is_dir()
        (tmp / "model.safetensors").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.pt").write_bytes(b"s")
        assert not target.exists()
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == [
        "model.safetensors", "sub", "sub/state.pt",
    ]
    assert os.listdir(tmp_path) == ["step-100"]


def test_atomic_directory_replaces_an_old_one_only_on_success(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(target) as tmp:
        (tmp / "v1").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "v2").write_text("2")
            raise RuntimeError("killed while saving")
    assert os.listdir(target) == ["v1"] and os.listdir(tmp_path) == ["final"]
    with atomic_directory(target) as tmp:
        (tmp / "v3").write_text("3")
    assert os.listdir(target) == ["v3"] and os.listdir(tmp_path) == ["final"]


def test_fill_directory_moves_the_content_in_with_the_marker_last(tmp_path, monkeypatch):
    """For an empty directory that cannot be renamed (a mount point): written inside, moved up, marker last;
    a failure leaves it empty; a killed writer's temporary is cleared by the next fill."""

    from clapcli.atomic import FILL_TEMP, fill_directory

    target = tmp_path / "mnt"
    target.mkdir()
    stale = target / f"{FILL_TEMP}.999999999.0123abcd.tmp"  # no such pid
    (stale / "big").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with fill_directory(target, last=("done",)) as tmp:
            (tmp / "data").write_text("x")
            raise RuntimeError("disk on fire")
    assert list(target.iterdir()) == []
    moves = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moves.append(Path(b).name) or real(a, b))
    with fill_directory(target, last=("done",)) as tmp:
        assert tmp.parent == target
        (tmp / "done").write_text("ok")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w").write_text("w")
        (tmp / "zz").write_text("z")
    assert moves == ["sub", "zz", "done"]
    assert sorted(p.name for p in target.iterdir()) == ["done", "sub", "zz"]
