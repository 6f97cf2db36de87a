"""Issue #20 (first half), through the real CLI on a tiny random model: a renamed, moved or copied file keeps the
vectors the index holds (bit for bit, no forward pass, no model load), --exclude is remembered per index until
--forget-exclude, and --forget drops a remembered folder that no longer exists."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap, fails
from clapcli.engine import load as load_mod
from clapcli.engine.clap import Clap
from library import summary


def clips(folder: Path, *names: str, seconds: float = 0.5, seed: int = 0) -> list[Path]:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_audio(folder / name, tone_noise(seconds, 16_000, seed=seed + i), 16_000)
    return [(folder / n).resolve() for n in names]


def segments(index_dir: Path) -> dict[str, tuple[int, list[tuple]]]:
    """path → (file id, [(start, end, kind, vector blob), …] by start): every stored vector, with plain SQL."""
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    rows = con.execute('SELECT f.path, f.id, s.start, s."end", s.kind, e.vector FROM files f '
                       "JOIN segments s ON s.file_id = f.id JOIN embeddings e ON e.segment_id = s.id "
                       "ORDER BY f.path, s.start, s.kind").fetchall()
    con.close()
    found: dict[str, tuple[int, list[tuple]]] = {}
    for path, file_id, start, end, kind, blob in rows:
        found.setdefault(path, (file_id, []))[1].append((start, end, kind, blob))
    return found


@pytest.fixture
def forward(monkeypatch):
    """Counts the model loads and the files handed to the engine's forward passes (the real ones run)."""
    seen = {"loads": 0, "embedded": []}
    real_load, real_embed = load_mod.load_model, Clap.embed_files

    def load_model(*args, **kwargs):
        seen["loads"] += 1
        return real_load(*args, **kwargs)

    def embed_files(self, paths, *args, **kwargs):
        paths = list(paths)
        seen["embedded"].extend(str(p) for p in paths)
        return real_embed(self, paths, *args, **kwargs)

    monkeypatch.setattr(load_mod, "load_model", load_model)
    monkeypatch.setattr(Clap, "embed_files", embed_files)
    return seen


def index(*args) -> dict:
    return summary(clap("index", *args, "--index", "lib", "--json"))


@pytest.fixture
def lib(tiny_model_dir, tmp_path, clap_home) -> Path:
    """A library indexed as "lib": two short clips and a 12 s one (windows) in sfx/, one clip in keep/."""
    root = tmp_path / "lib"
    clips(root / "sfx", "whoosh.wav", "impact.wav")
    clips(root / "sfx", "long.wav", seconds=12.0, seed=7)
    clips(root / "keep", "pad.wav", seed=11)
    s = summary(clap("index", root, "--index", "lib", "--model", tiny_model_dir, "--json"))
    assert s["added"] == 4
    return root


def index_dir(clap_home: Path) -> Path:
    return clap_home / "indexes" / "lib"


def test_a_renamed_file_keeps_its_row_and_vectors_with_no_forward_pass(lib, clap_home, forward):
    before = segments(index_dir(clap_home))
    old, new = (lib / "sfx" / "long.wav").resolve(), lib / "sfx" / "Long take (renamed).wav"
    old.rename(new)
    result = clap("index", "--index", "lib")
    assert "1 moved" in result.output and "0 added" in result.output
    s = index()
    assert s["unchanged"] == 4 and s["moved"] == 0  # the second run has nothing left to do
    after = segments(index_dir(clap_home))
    assert after[str(new.resolve())] == before[str(old)]  # same file id, windows and vectors, bit for bit
    assert str(old) not in after and len(before[str(old)][1]) > 1
    assert forward == {"loads": 0, "embedded": []}


def test_a_renamed_folder_moves_every_file_in_one_run(lib, clap_home, forward):
    before = segments(index_dir(clap_home))
    (lib / "sfx").rename(lib / "effects")
    s = index()
    assert (s["moved"], s["added"], s["removed"], s["copied"], s["audio_seconds"]) == (3, 0, 0, 0, 0)
    after = segments(index_dir(clap_home))
    for name in ("whoosh.wav", "impact.wav", "long.wav"):
        assert after[str((lib / "effects" / name).resolve())] == before[str((lib / "sfx" / name).resolve())]
    assert len(after) == 4 and forward == {"loads": 0, "embedded": []}
    hits = json.loads(clap("search", "whoosh", "--index", "lib", "--json", "-k", "4").stdout.splitlines()[0])
    assert "/effects/" in hits["path"] or "/keep/" in hits["path"]  # search sees the new paths


def test_a_file_moved_across_roots_of_one_index_keeps_its_vectors(tiny_model_dir, tmp_path, clap_home, forward):
    a, b = tmp_path / "a", tmp_path / "b"
    one, _ = clips(a, "one.wav", "stays.wav")
    clips(b, "two.wav", seed=5)
    clap("index", a, b, "--index", "lib", "--model", tiny_model_dir)
    before = segments(index_dir(clap_home))
    forward.update(loads=0, embedded=[])
    shutil.move(one, b / "one.wav")
    s = index()  # no folder: both remembered roots
    assert (s["moved"], s["added"], s["removed"]) == (1, 0, 0)
    assert segments(index_dir(clap_home))[str((b / "one.wav").resolve())] == before[str(one)]
    assert forward == {"loads": 0, "embedded": []}


def test_a_copy_gets_the_vectors_copied_not_recomputed(lib, clap_home, forward):
    before = segments(index_dir(clap_home))
    old = (lib / "sfx" / "long.wav").resolve()
    shutil.copy2(old, lib / "keep" / "long copy.wav")
    result = clap("index", "--index", "lib")
    assert "1 copied" in result.output
    after = segments(index_dir(clap_home))
    copy_id, copy = after[str((lib / "keep" / "long copy.wav").resolve())]
    assert after[str(old)] == before[str(old)]  # the original is untouched
    assert copy == before[str(old)][1] and copy_id != before[str(old)][0]  # its own row, the same vectors
    assert forward == {"loads": 0, "embedded": []}
    (lib / "keep" / "long copy.wav").unlink()  # the copy's own segments go with it; the original's stay
    s = index()
    assert s["removed"] == 1 and segments(index_dir(clap_home))[str(old)] == before[str(old)]


def test_a_move_with_a_content_change_is_embedded_again(lib, clap_home, forward):
    before = segments(index_dir(clap_home))
    old = (lib / "sfx" / "whoosh.wav").resolve()
    old.unlink()
    (new,) = clips(lib / "sfx", "whoosh_v2.wav", seed=42)  # another take under a new name
    s = index()
    assert (s["added"], s["removed"], s["moved"], s["copied"]) == (1, 1, 0, 0)
    assert forward["loads"] == 1 and forward["embedded"] == [str(new)]
    assert segments(index_dir(clap_home))[str(new)][1] != before[str(old)][1]


def test_two_identical_files_renamed_at_once_each_get_stored_vectors(tiny_model_dir, tmp_path, clap_home, forward):
    root = tmp_path / "dups"
    (first,) = clips(root, "take.wav", seed=3)
    shutil.copy2(first, root / "take copy.wav")
    clap("index", root, "--index", "lib", "--model", tiny_model_dir)
    before = segments(index_dir(clap_home))
    forward.update(loads=0, embedded=[])
    (root / "take.wav").rename(root / "a.wav")
    (root / "take copy.wav").rename(root / "b.wav")
    s = index()
    assert (s["moved"], s["added"], s["removed"], s["copied"]) == (2, 0, 0, 0)
    after = segments(index_dir(clap_home))
    assert sorted(after) == [str((root / n).resolve()) for n in ("a.wav", "b.wav")]
    assert sorted(after.values()) == sorted(before.values())  # both rows moved, ids and vectors kept
    assert forward == {"loads": 0, "embedded": []}


# -- remembered exclusions ---------------------------------------------------------------------------------


def test_an_exclude_is_remembered_listed_and_forgotten(tiny_model_dir, tmp_path, clap_home, forward):
    root = tmp_path / "lib"
    clips(root, "a.wav", "b.wav", "drafts/c.wav")
    clap("index", root, "--index", "lib", "--model", tiny_model_dir)
    s = index("--exclude", "drafts")
    assert s["removed"] == 1 and s["removed_excluded"] == 1 and s["excludes"] == ["drafts"]
    s = index()  # a plain run keeps skipping it
    assert (s["added"], s["total_files"], s["excludes"]) == (0, 2, ["drafts"])
    result = clap("index", "--index", "lib")
    assert "skipping 'drafts'" in result.output and "--forget-exclude" in result.output
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["excludes"] == ["drafts"]
    fails("index", "--index", "lib", "--forget-exclude", "*.mp3", code=2, match="it excludes 'drafts'")
    s = index("--forget-exclude", "drafts")
    assert (s["total_files"], s["excludes"]) == (3, [])
    assert s["added"] == 1  # its vectors went with the exclusion: embedded again
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["excludes"] == []


def test_a_rebuild_keeps_the_remembered_excludes(tiny_model_dir, tmp_path, clap_home):
    root = tmp_path / "lib"
    clips(root, "a.wav", "b.tmp.wav")
    clap("index", root, "--index", "lib", "--model", tiny_model_dir, "--exclude", "*.tmp.wav")
    s = index("--rebuild")
    assert (s["added"], s["total_files"], s["excludes"]) == (1, 1, ["*.tmp.wav"])
    assert index()["excludes"] == ["*.tmp.wav"]


# -- forgetting a folder that is gone ------------------------------------------------------------------------


def test_a_deleted_folder_is_named_with_forget_and_forgotten(tiny_model_dir, tmp_path, clap_home):
    good, bad = tmp_path / "good", tmp_path / "bad"
    clips(good, "one.wav")
    clips(bad, "two.wav", "three.wav", seed=4)
    clap("index", good, bad, "--index", "lib", "--model", tiny_model_dir)
    shutil.rmtree(bad)
    fails("index", bad, "--index", "lib", "--prune-empty", code=1, match=f"`clap index --forget {bad}`")
    s = index("--forget", bad)
    assert s["forgotten"] == [{"path": str(bad.resolve()), "removed_files": 2}] and s["total_files"] == 1
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["roots"] == [str(good.resolve())]
    assert index()["removed"] == 0  # no --prune-empty needed any more


def test_the_only_remembered_folder_gone_can_be_forgotten_by_name(tiny_model_dir, tmp_path, clap_home):
    bad = tmp_path / "bad"
    clips(bad, "two.wav")
    clap("index", bad, "--index", "lib", "--model", tiny_model_dir)
    shutil.rmtree(bad)
    s = index(bad, "--forget", bad)
    assert s["forgotten"] == [{"path": str(bad.resolve()), "removed_files": 1}] and s["total_files"] == 0


def test_a_missing_folder_inside_a_remembered_one_says_how_to_prune_it(lib):
    fails("index", lib / "sfx" / "gone", "--index", "lib", code=1, match=f"`clap index {lib.resolve()}`")


def test_a_renamed_root_moves_its_files_when_the_old_name_is_forgotten(tiny_model_dir, tmp_path, clap_home, forward):
    old, new = tmp_path / "samples", tmp_path / "samples-2024"
    clips(old, "one.wav", "two.wav")
    clap("index", old, "--index", "lib", "--model", tiny_model_dir)
    before = segments(index_dir(clap_home))
    forward.update(loads=0, embedded=[])
    old.rename(new)
    s = index(new, "--forget", old)
    assert (s["moved"], s["added"], s["removed"], s["total_files"]) == (2, 0, 0, 2)
    after = segments(index_dir(clap_home))
    assert after == {str(new.resolve() / Path(p).name): v for p, v in before.items()}
    assert forward == {"loads": 0, "embedded": []}
    (row,) = [json.loads(line) for line in clap("index", "list", "--json").stdout.splitlines()]
    assert row["roots"] == [str(new.resolve())]
