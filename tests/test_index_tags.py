"""Tags stored in an index (issue 22): `clap tag --index` tags every file from its stored vector with no audio work,
`clap search --tag/--not-tag` filters by them and `--json` carries them, `clap index list` shows the sets, the next
`clap index` tags new files and replaces a changed file's tags, and `--classifier` reads the stored norms (embedding
again only the files stored without them). Through the CLI, on real indexes of synthesised audio, tiny models."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap, fails

LABELS = "dog,rain,siren,engine,bird"


def json_lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def stored_tags(index: Path) -> dict[str, list[tuple[str, float]]]:
    """path → [(label, score)] by rank, read with plain SQL."""
    con = sqlite3.connect(f"file:{index / 'index.sqlite'}?mode=ro", uri=True)
    rows = con.execute("SELECT f.path, t.label, t.score FROM file_tags t JOIN files f ON f.id = t.file_id "
                       "ORDER BY f.path, t.set_id, t.rank").fetchall()
    con.close()
    found: dict[str, list] = {}
    for path, label, score in rows:
        found.setdefault(path, []).append((label, score))
    return found


def write_library(lib: Path) -> list[Path]:
    lib.mkdir(parents=True, exist_ok=True)
    files = [lib / f"clip_{i}.wav" for i in range(6)]
    for i, f in enumerate(files):
        write_audio(f, tone_noise(0.8 + 0.6 * i, seed=i), 48_000)
    files.append(lib / "long.wav")
    write_audio(files[-1], tone_noise(23.0, seed=40), 48_000)
    return files


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A library and its index (tiny fused model), built once; tests work on copies of the index."""
    root = tmp_path_factory.mktemp("tags")
    files = write_library(root / "lib")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(root / "home"))
        clap("index", root / "lib", "--index", root / "index", "--model", tiny_model_dir)
    return root, files


@pytest.fixture
def index(built, tmp_path) -> Path:
    root, _ = built
    copy = tmp_path / "index"
    shutil.copytree(root / "index", copy)
    return copy


class AudioWork:
    """Counts audio forward passes and decoder opens while installed."""

    def __init__(self, monkeypatch):
        from clapcli.audio import decode
        from clapcli.models.clap import ClapModel

        self.forward = self.decoded = 0
        encode, open_ = ClapModel.encode_audio, decode._open

        def counted_encode(model, *a, **k):
            self.forward += 1
            return encode(model, *a, **k)

        def counted_open(*a, **k):
            self.decoded += 1
            return open_(*a, **k)

        monkeypatch.setattr(ClapModel, "encode_audio", counted_encode)
        monkeypatch.setattr(decode, "_open", counted_open)


def tag_files_json(files, *args) -> dict[str, list[tuple[str, float]]]:
    """`clap tag FILES… --json`: resolved path → [(label, prob)]."""
    out = json_lines(clap("tag", *files, *args, "--json"))
    return {str(Path(r["path"]).resolve()): [(s["label"], s["prob"]) for s in r["labels"]] for r in out}


def assert_same_tags(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert [label for label, _ in got[path]] == [label for label, _ in want[path]], path
        np.testing.assert_allclose([s for _, s in got[path]], [s for _, s in want[path]], atol=2e-5)


def test_tag_index_stores_what_clap_tag_gives_without_audio_work(built, index, tiny_model_dir, monkeypatch):
    _, files = built
    want = tag_files_json(files, "--labels", LABELS, "--top", "3", "--model", tiny_model_dir)
    work = AudioWork(monkeypatch)
    run = json_lines(clap("tag", "--index", index, "--labels", LABELS, "--top", "3", "--json"))[0]
    assert (work.forward, work.decoded) == (0, 0)
    assert run["tagged"] == len(files) and run["embedded"] == 0 and run["set"]["top_k"] == 3
    assert run["set"]["kind"] == "zero-shot" and run["set"]["labels"] == 5
    assert_same_tags(stored_tags(index), want)
    # The same set again replaces its tags (here with fewer per file) rather than adding a second set.
    again = json_lines(clap("tag", "--index", index, "--labels", LABELS, "--top", "1", "--json"))[0]
    assert again["set"]["id"] == run["set"]["id"]
    assert_same_tags(stored_tags(index), {p: tags[:1] for p, tags in want.items()})


def test_search_filters_by_tags_and_json_carries_them(index):
    clap("tag", "--index", index, "--labels", LABELS, "--top", "2")
    tags = stored_tags(index)
    top = {path: t[0][0] for path, t in tags.items()}
    label = max(set(top.values()), key=list(top.values()).count)  # a label that tops some files
    holders = {p for p, t in tags.items() if label in [name for name, _ in t]}
    hits = json_lines(clap("search", "a sound", "--index", index, "--tag", label, "-k", "50", "--json"))
    assert {h["path"] for h in hits} == holders
    for h in hits:
        assert [(t["label"], t["score"]) for t in h["tags"]] == [(n, round(s, 6)) for n, s in tags[h["path"]]]
        assert {t["set"] for t in h["tags"]} == {"custom"}
    rest = json_lines(clap("search", "a sound", "--index", index, "--not-tag", label, "-k", "50", "--json"))
    assert {h["path"] for h in rest} == set(tags) - holders
    k1 = json_lines(clap("search", "a sound", "--index", index, "--tag", label, "-k", "1", "--json"))
    assert len(k1) == 1 and k1[0]["path"] in holders  # neighbours are fetched on until k files pass
    from cli_runner import runner
    from clapcli.cli.main import app

    piped = runner.invoke(app, ["search", "--stdin", "--index", str(index), "--tag", label, "-k", "50", "--json"],
                          input="a sound\n")
    (answer,) = json_lines(piped)
    assert {r["path"] for r in answer["results"]} == holders and all(r["tags"] for r in answer["results"])
    fails("search", "a sound", "--index", index, "--tag", "dgo", code=2, match="did you mean dog")
    fails("search", "a sound", "--index", index, "--tag", label, "--tag-set", "nope", code=2, match="no tag set 'nope'")


def test_tag_filter_on_an_index_without_tags_says_how_to_make_them(index):
    fails("search", "a sound", "--index", index, "--tag", "dog", code=2, match="clap tag --index")
    plain = json_lines(clap("search", "a sound", "--index", index, "--json"))
    assert plain and all("tags" not in h for h in plain)  # unchanged output for an index without tags


def test_index_list_shows_the_tag_sets(built, monkeypatch, tmp_path):
    root, files = built
    named = tmp_path / "clap-home" / "indexes" / "sfx"
    shutil.copytree(root / "index", named)
    clap("tag", "--index", "sfx", "--labels", LABELS, "--top", "2")
    (row,) = json_lines(clap("index", "list", "--json"))
    assert row["tag_sets"] == [{"id": 1, "kind": "zero-shot", "name": "custom", "labels": 5,
                                "templates": ["This is a sound of {}."], "top_k": 2, "classifier": None,
                                "files": len(files)}]
    from clapcli.cli import index_admin
    from rich.console import Console

    con = Console(width=80, record=True)
    index_admin.print_index_list(con, [row])
    assert f"tags   1: custom (zero-shot, 5 labels, top 2), {len(files)} files tagged" in con.export_text()


def test_next_index_tags_new_files_and_replaces_a_changed_files_tags(tmp_path, tiny_model_dir):
    lib, index = tmp_path / "lib", tmp_path / "index"
    write_library(lib)
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    clap("tag", "--index", index, "--labels", LABELS, "--top", "2")
    new, changed = lib / "new.wav", lib / "clip_0.wav"
    write_audio(new, tone_noise(2.0, seed=77), 48_000)
    write_audio(changed, tone_noise(5.0, seed=78), 48_000)
    before = stored_tags(index)
    summary = json_lines(clap("index", lib, "--index", index, "--json"))[-1]
    assert summary["added"] == 1 and summary["updated"] == 1
    assert summary["tags"] == [{"set": 1, "name": "custom", "tagged": 2, "needs_audio": 0, "failed": []}]
    after = stored_tags(index)
    want = tag_files_json([new, changed], "--labels", LABELS, "--top", "2", "--model", tiny_model_dir)
    assert_same_tags({p: after[p] for p in want}, want)
    assert {p: t for p, t in after.items() if p not in want} == {p: t for p, t in before.items() if p not in want}


def test_a_replaced_file_vector_takes_its_tags_along(index):
    """A file whose file-level vector goes (embedded again, or now an error row) loses its tags with it (the trigger
    of migration 6), whether or not it is tagged again afterwards; other files keep theirs."""
    clap("tag", "--index", index, "--labels", LABELS)
    con = sqlite3.connect(index / "index.sqlite")
    con.execute("PRAGMA foreign_keys = ON")
    (file_id,) = con.execute("SELECT id FROM files LIMIT 1").fetchone()
    con.execute("DELETE FROM segments WHERE file_id = ? AND kind = 'file'", (file_id,))
    con.commit()
    assert con.execute("SELECT count(*) FROM file_tags WHERE file_id = ?", (file_id,)).fetchone() == (0,)
    assert con.execute("SELECT count(*) FROM file_tags").fetchone()[0] > 0
    con.close()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_model_dir):
    """A linear head on the tiny fused model, trained in a few epochs on the four kinds of tests/train_data.py."""
    from test_finetune import class_folders

    root = tmp_path_factory.mktemp("tags-head")
    class_folders(root / "train", per_kind=4, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(root / "home"))
        clap("finetune", "--data", root / "train", "--model", tiny_model_dir, "--out", root / "clf", "--epochs", "3",
             "--batch-size", "8", "--seed", "0")
    return root / "clf"


def test_classifier_tags_come_from_the_stored_norms(built, index, classifier, monkeypatch):
    _, files = built
    want = tag_files_json(files, "--classifier", classifier, "--top", "2")
    work = AudioWork(monkeypatch)
    run = json_lines(clap("tag", "--index", index, "--classifier", classifier, "--top", "2", "--json"))[0]
    assert (work.forward, work.decoded) == (0, 0)
    assert run["tagged"] == len(files) and run["embedded"] == 0 and run["set"]["kind"] == "classifier"
    assert_same_tags(stored_tags(index), want)


def test_classifier_embeds_again_only_files_stored_without_norms(built, index, classifier, monkeypatch):
    _, files = built
    con = sqlite3.connect(index / "index.sqlite")
    con.execute("UPDATE segments SET norm = NULL WHERE file_id = (SELECT id FROM files WHERE path = ?)",
                (str(files[1].resolve()),))
    con.commit()
    con.close()
    want = tag_files_json(files, "--classifier", classifier, "--top", "2")
    work = AudioWork(monkeypatch)
    run = json_lines(clap("tag", "--index", index, "--classifier", classifier, "--top", "2", "--json"))[0]
    assert run["tagged"] == len(files) and run["embedded"] == 1
    assert work.decoded == 1 and work.forward >= 1
    assert_same_tags(stored_tags(index), want)


def test_classifier_of_another_model_is_refused(tmp_path, tiny_unfused_dir, classifier):
    lib = tmp_path / "lib"
    write_library(lib)
    clap("index", lib, "--index", tmp_path / "other", "--model", tiny_unfused_dir)
    fails("tag", "--index", tmp_path / "other", "--classifier", classifier, code=2, match="was trained on model")


def test_unfused_long_files_read_their_windows_norms(tmp_path, tiny_unfused_dir, monkeypatch):
    """An unfused model's long file has no file-level pass: its raw vector is the mean of its windows' raw vectors,
    which the stored window norms give."""
    from clapcli.engine.load import load_model
    from clapcli.index.store import IndexStore
    from clapcli.index.tag_store import file_paths, file_vectors
    from clapcli.library.tags import _raw_vectors

    lib = tmp_path / "lib"
    files = write_library(lib)
    clap("index", lib, "--index", tmp_path / "idx", "--model", tiny_unfused_dir)
    model = load_model(str(tiny_unfused_dir), device="cpu", precision="fp32")
    raw = {str(Path(e.path).resolve()): e.embedding
           for e in model.embed_files(files, segments=False, normalize=False)}
    with IndexStore.open(tmp_path / "idx", readonly=True) as store:
        ids, vectors, norms = file_vectors(store)
        paths = file_paths(store, ids)
        got, known = _raw_vectors(store, ids, vectors, norms)
    assert known.all()
    long_row = [paths[int(i)] for i in ids].index(str(files[-1].resolve()))
    assert np.isnan(norms[long_row])  # no file-level norm: read from the windows
    for row, file_id in enumerate(ids.tolist()):
        np.testing.assert_allclose(got[row], raw[paths[file_id]], rtol=1e-4, atol=1e-5)


def test_rebuild_keeps_the_tag_sets_and_tags_everything_again(tmp_path, tiny_model_dir):
    lib, index = tmp_path / "lib", tmp_path / "index"
    write_library(lib)
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    clap("tag", "--index", index, "--labels", LABELS, "--top", "2")
    before = stored_tags(index)
    summary = json_lines(clap("index", "--index", index, "--rebuild", "--json"))[-1]
    assert summary["tags"] == [{"set": 1, "name": "custom", "tagged": len(before), "needs_audio": 0, "failed": []}]
    assert_same_tags(stored_tags(index), before)


def test_forget_drops_a_tag_set_and_clap_index_stops_using_it(index):
    clap("tag", "--index", index, "--labels", LABELS)
    clap("tag", "--index", index, "--labels", "esc50", "--top", "1")
    out = json_lines(clap("tag", "--index", index, "--forget", "custom", "--json"))
    assert [(o["forgot"]["name"], o["files"]) for o in out] == [("custom", len(stored_tags(index)))]
    con = sqlite3.connect(f"file:{index / 'index.sqlite'}?mode=ro", uri=True)
    assert con.execute("SELECT name FROM tag_sets").fetchall() == [("esc50",)]
    assert con.execute("SELECT DISTINCT set_id FROM file_tags").fetchall() == [(2,)]
    con.close()
    fails("tag", "--index", index, "--forget", "custom", code=2, match="no tag set 'custom'")
    fails("tag", "--forget", "1", code=2, match="give the index with --index")


@pytest.mark.parametrize("family", ["fused", "unfused", "wav2clip"])
def test_the_engine_reports_the_raw_norm_of_each_vector(family, tiny_model_dir, tiny_unfused_dir, tmp_path):
    """`AudioEmbedding.norm` and `Segment.norm`: norm × vector is the raw projection output (`normalize=False`),
    for a short and a long file, windows included; None for an unfused long file's mean of windows."""
    from clapcli.engine.load import load_model

    if family == "wav2clip":
        from clapcli.models.checkpoints import save_own
        from test_wav2clip import tiny_model

        save_own(tiny_model("no-such-org/no-such-clip"), None, tmp_path / "w2c")
        directory = tmp_path / "w2c"
    else:
        directory = tiny_model_dir if family == "fused" else tiny_unfused_dir
    model = load_model(str(directory), device="cpu", precision="fp32")
    waves = [tone_noise(3.0, seed=1, quantize=False), tone_noise(23.0, seed=2, quantize=False)]
    normal = model.embed_waveforms(waves, segments=True)
    raw = model.embed_waveforms(waves, segments=True, normalize=False)
    for n, r, long in zip(normal, raw, (False, True)):
        if family == "unfused" and long:
            assert n.norm is None
        else:
            np.testing.assert_allclose(n.norm * n.embedding, r.embedding, rtol=1e-5, atol=1e-6)
        assert len(n.segments) == len(r.segments) and (not long or n.segments)
        for s, rs in zip(n.segments, r.segments):
            np.testing.assert_allclose(s.norm * s.embedding, rs.embedding, rtol=1e-5, atol=1e-6)
