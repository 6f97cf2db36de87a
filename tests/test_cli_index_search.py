"""`clap index` and `clap search` end to end, through the real CLI, on a tiny random model.

A session-scoped library of 42 good files (nested folders; wav/flac/ogg/mp3/aiff; 8–96 kHz; 1, 2 and
6 channels; 0.2 s to 90 s) plus three broken ones is indexed once and then queried, re-indexed,
modified, killed and compared.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_runner import clap
from entry_point import clap_executable
from library import BROKEN, GOOD, make_library, write_window_query

HIT_KEYS = {"rank", "score", "path", "start", "end", "duration", "ranges", "missing", "query"}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def index_contents(index_dir: Path) -> dict[str, tuple]:
    """Everything an index stores, keyed by path, without the (run-dependent) row ids."""
    con = sqlite3.connect(index_dir / "index.sqlite")
    files = {}
    for fid, path, size, mtime, digest, duration, status, error in con.execute(
        "SELECT id, path, size, mtime_ns, content_hash, duration, status, error FROM files"
    ):
        segs = con.execute(
            'SELECT s.start, s."end", s.kind, e.vector FROM segments s JOIN embeddings e ON e.segment_id = s.id '
            "WHERE s.file_id = ? ORDER BY s.start, s.kind",
            (fid,),
        ).fetchall()
        files[path] = (size, mtime, digest, duration, status, error is not None,
                       [(a, b, k, np.frombuffer(v, np.float32)) for a, b, k, v in segs])
    orphans = con.execute(
        "SELECT count(*) FROM embeddings WHERE segment_id NOT IN (SELECT id FROM segments)"
    ).fetchone()[0] + con.execute("SELECT count(*) FROM segments WHERE file_id NOT IN (SELECT id FROM files)").fetchone()[0]
    con.close()
    assert orphans == 0
    return files


def assert_same_contents(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for path in a:
        *meta_a, segs_a = a[path]
        *meta_b, segs_b = b[path]
        assert meta_a == meta_b, path
        assert [s[:3] for s in segs_a] == [s[:3] for s in segs_b], path
        for sa, sb in zip(segs_a, segs_b):
            assert np.allclose(sa[3], sb[3], atol=1e-5), path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("library")
    durations = make_library(root)
    return root, durations


@pytest.fixture(scope="module")
def built(library, tiny_model_dir, tmp_path_factory):
    """The library indexed once with the real CLI; returns (index dir, summary)."""
    root, _ = library
    index_dir = tmp_path_factory.mktemp("idx") / "main"
    result = clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--json", "--workers", "1")
    return index_dir, json_lines(result.stdout)[-1]


def test_index_reports_broken_files_and_embeds_everything_else(library, built):
    root, durations = library
    index_dir, summary = built
    assert summary["added"] == len(GOOD) and summary["scanned"] == len(GOOD) + len(BROKEN)
    skipped = {Path(s["path"]).relative_to(root).as_posix(): s["reason"] for s in summary["skipped_files"]}
    assert set(skipped) == set(BROKEN)
    assert "empty" in skipped["broken/empty.wav"]
    assert "not a recognised audio file" in skipped["broken/not_audio.wav"]
    assert "truncated" in skipped["broken/truncated.flac"] or "lost sync" in skipped["broken/truncated.flac"]
    contents = index_contents(index_dir)
    good = {p: c for p, c in contents.items() if c[4] == "ok"}
    assert set(good) == set(durations)
    for path, (_, _, _, duration, _, _, segs) in good.items():
        assert duration == pytest.approx(durations[path], abs=0.03)
        windows = [s for s in segs if s[2] == "window"]
        assert sum(s[2] == "file" for s in segs) == 1
        if duration > 10.0:  # full coverage: windows from 0, the last one ending at the file end
            assert windows[0][0] == 0.0 and windows[-1][1] == pytest.approx(duration, abs=1e-3)
            assert all(b[0] <= a[1] for a, b in zip(windows, windows[1:]))
        else:
            assert not windows


def test_every_good_file_is_searchable(library, built, tiny_model_dir):
    _, durations = library
    index_dir, _ = built
    result = clap("search", "rain on a roof", "--index", index_dir, "-k", "100", "--json")
    hits = json_lines(result.stdout)
    assert {h["path"] for h in hits} == set(durations)
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all(set(h) == HIT_KEYS for h in hits)
    assert all(a["score"] >= b["score"] for a, b in zip(hits, hits[1:]))
    for h in hits:
        assert (h["start"] is None) == (durations[h["path"]] <= 10.0)


def test_query_by_example_finds_the_window_and_its_offset(library, built, tmp_path):
    from clapcli.audio.decode import load_audio

    root, _ = library
    index_dir, _ = built
    long_file = root / "ambience/field_recording_long.wav"  # 90 s float WAV at 48 kHz
    samples = load_audio(long_file, quantize=False)
    query = tmp_path / "query.wav"
    write_window_query(query, samples[2 * 480_000 : 3 * 480_000])
    hits = json_lines(clap("search", "--audio", query, "--index", index_dir, "--json", "-k", "3").stdout)
    assert hits[0]["path"] == str(long_file.resolve())
    assert (hits[0]["start"], hits[0]["end"]) == (20.0, 30.0)
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_search_paths_and_min_score(built):  # --not: see test_not_term_pushes_its_files_down
    index_dir, _ = built
    paths = clap("search", "glass shattering", "--index", index_dir, "--paths", "-k", "5").stdout.split()
    assert len(paths) == 5 and all(Path(p).is_absolute() for p in paths)
    scored = json_lines(clap("search", "glass shattering", "--index", index_dir, "--json", "-k", "50").stdout)
    cut = scored[10]["score"]
    kept = json_lines(clap("search", "glass shattering", "--index", index_dir, "--json", "-k", "50",
                           "--min-score", cut).stdout)
    assert kept and all(h["score"] >= cut for h in kept) and len(kept) <= 11


def test_search_errors_are_one_line(tmp_path, built, tiny_unfused_dir):
    missing = clap("search", "dog", "--index", tmp_path / "nothing", ok=False)
    assert missing.exit_code != 0 and "no index at" in str(missing.exception)
    index_dir, _ = built
    other = clap("search", "dog", "--index", index_dir, "--model", tiny_unfused_dir, ok=False)
    assert other.exit_code != 0 and "search without --model" in str(other.exception)  # search has no --rebuild


def test_index_with_another_model_is_refused(library, built, tiny_unfused_dir):
    root, _ = library
    index_dir, _ = built
    result = clap("index", root, "--index", index_dir, "--model", tiny_unfused_dir, ok=False)
    assert result.exit_code != 0 and "pass the same --model or --rebuild" in str(result.exception)


def test_incremental_rerun_modify_and_delete(tiny_model_dir, tmp_path):
    root = tmp_path / "lib"
    make_library(root, good=GOOD[:6] + GOOD[22:23])
    index_dir = tmp_path / "idx"
    first = json_lines(clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--json").stdout)[-1]
    assert first["added"] == 7
    before = index_contents(index_dir)

    again = json_lines(clap("index", root, "--index", index_dir, "--json").stdout)[-1]
    assert (again["added"], again["updated"], again["removed"], again["audio_seconds"]) == (0, 0, 0, 0.0)
    assert again["unchanged"] == 7 + len(BROKEN)
    assert again["total_errors"] == len(BROKEN) and len(again["unreadable_files"]) == len(BROKEN)
    assert_same_contents(before, index_contents(index_dir))

    touched = root / GOOD[1][0]
    os.utime(touched, ns=(time.time_ns(), time.time_ns()))  # new mtime, same bytes: no model work
    modified = root / GOOD[0][0]
    from audio_synth import tone_noise, write_audio

    write_audio(modified, tone_noise(0.7, 44_100, seed=1234), 44_100, subtype="PCM_16")
    deleted = root / GOOD[2][0]
    deleted.unlink()
    third = json_lines(clap("index", root, "--index", index_dir, "--json").stdout)[-1]
    assert (third["added"], third["updated"], third["removed"], third["touched"]) == (0, 1, 1, 1)
    after = index_contents(index_dir)
    assert str(deleted.resolve()) not in after
    assert after[str(modified.resolve())][3] == pytest.approx(0.7, abs=1e-3)
    assert not np.allclose(after[str(modified.resolve())][6][0][3], before[str(modified.resolve())][6][0][3])
    for path in set(after) - {str(modified.resolve()), str(touched.resolve())}:
        assert after[path][2] == before[path][2]
    hits = json_lines(clap("search", "dog", "--index", index_dir, "--json", "-k", "50").stdout)
    assert str(deleted.resolve()) not in {h["path"] for h in hits} and len(hits) == 6


def test_second_writer_is_refused(tiny_model_dir, tmp_path):
    from clapcli.index.lock import WriterLock

    root = tmp_path / "lib"
    make_library(root, good=GOOD[:2])
    index_dir = tmp_path / "idx"
    with WriterLock(index_dir):
        result = clap("index", root, "--index", index_dir, "--model", tiny_model_dir, ok=False)
    assert result.exit_code != 0 and "being written by another" in str(result.exception)


def test_empty_index_search_is_an_error(tiny_model_dir, tmp_path):
    root = tmp_path / "lib"
    (root / "broken").mkdir(parents=True)
    (root / "broken" / "x.wav").write_text("not audio")
    clap("index", root, "--index", tmp_path / "idx", "--model", tiny_model_dir)
    result = clap("search", "dog", "--index", tmp_path / "idx", ok=False)
    assert result.exit_code != 0 and "is empty" in str(result.exception)


def _committed_files(index_dir: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=1)
        n = con.execute("SELECT count(*) FROM files").fetchone()[0]
        con.close()
        return n
    except sqlite3.Error:
        return -1


def test_sigkill_at_any_point_then_rerun_equals_a_clean_build(tiny_model_dir, tmp_path):
    kill_and_rerun(tiny_model_dir, tmp_path, kill_points=(0, 4, 10))


@pytest.mark.slow
def test_sigkill_after_every_commit_then_rerun_equals_a_clean_build(tiny_model_dir, tmp_path):
    """The test above killed after each commit up to 12 files (of 14 good + 3 broken, 2 per commit)."""
    kill_and_rerun(tiny_model_dir, tmp_path, kill_points=range(0, 14, 2))


def kill_and_rerun(tiny_model_dir, tmp_path, kill_points):
    """SIGKILL `clap index` once `kill_at` file rows are committed, then the same command again must give
    the index a clean build gives."""
    root = tmp_path / "lib"
    make_library(root, good=[g for g in GOOD if g[1] <= 16.0][:14])
    clean_dir = tmp_path / "clean"
    clap("index", root, "--index", clean_dir, "--model", tiny_model_dir, "--commit-every", "2")
    clean = index_contents(clean_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "clapcli", "index", str(root), "--model", str(tiny_model_dir),
           "--commit-every", "2", "--batch-size", "2", "--workers", "0"]
    for kill_at in kill_points:  # committed file rows when the indexer is killed
        index_dir = tmp_path / f"killed-{kill_at}"
        proc = subprocess.Popen(cmd + ["--index", str(index_dir)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _committed_files(index_dir) < kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL, "the indexer finished before it could be killed"
        assert _committed_files(index_dir) < len(clean)  # killed part-way, not after the last commit
        if (index_dir / "index.sqlite").exists():  # what was committed opens and searches
            con = sqlite3.connect(index_dir / "index.sqlite")
            assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            embedded = con.execute("SELECT count(*) FROM embeddings").fetchone()[0]
            con.close()
            if embedded:  # (the first commits may hold only the broken files: nothing to search yet)
                clap("search", "dog", "--index", index_dir, "--json")
        clap("index", root, "--index", index_dir, "--model", tiny_model_dir)  # the same command again
        assert_same_contents(clean, index_contents(index_dir))
        hits = json_lines(clap("search", "dog", "--index", index_dir, "--json", "-k", "100").stdout)
        assert len(hits) == len({p for p, c in clean.items() if c[4] == "ok"})


def test_entry_point_index_and_search(tiny_model_dir, tmp_path):
    root = tmp_path / "lib"
    make_library(root, good=GOOD[:3])
    env = dict(os.environ, CLAP_HOME=str(tmp_path / "home"))
    subprocess.run([clap_executable(), "index", str(root), "--model", str(tiny_model_dir)], env=env, check=True,
                   capture_output=True, timeout=300)
    out = subprocess.run([clap_executable(), "search", "a kick", "--json"], env=env, check=True, capture_output=True,
                         text=True, timeout=300).stdout
    assert len(json_lines(out)) == 3


def test_undecodable_file_name_is_skipped_not_fatal(tiny_model_dir, tmp_path):
    root = tmp_path / "lib"
    make_library(root, good=GOOD[:2])
    from audio_synth import tone_noise, write_audio

    plain = write_audio(root / "plain.wav", tone_noise(0.5, 44_100), 44_100)
    os.rename(os.fsencode(plain), os.path.join(os.fsencode(root), b"bad-\xff-name.wav"))  # not UTF-8
    summary = json_lines(clap("index", root, "--index", tmp_path / "idx", "--model", tiny_model_dir,
                              "--json").stdout)[-1]
    assert summary["added"] == 2
    assert any("not valid UTF-8" in s["reason"] for s in summary["skipped_files"])


def test_files_under_an_unreadable_folder_are_not_pruned(tmp_path):
    from clapcli.index.indexer import plan_changes
    from clapcli.index.scan import ScanEntry
    from clapcli.index.store import IndexStore

    lib = tmp_path.resolve() / "lib"  # stored paths are resolved ones
    with IndexStore.open(tmp_path / "idx", create=True) as store:
        vec = np.ones(4, np.float32) / 2
        for name in ("a/x.wav", "b/y.wav", "c/z.wav"):
            store.upsert_file(str(lib / name), 1, 1, "h", 1.0, 48_000, 1, [(0.0, 1.0, "file", vec)])
        plan = plan_changes(store, [ScanEntry(lib / "c/z.wav", 1, 1)], [lib], unread_dirs=[lib / "a"])
    assert plan.to_remove == [str(lib / "b/y.wav")] and plan.unchanged == 1


def test_moved_model_directory_still_matches_its_index(library, built, tiny_model_dir, tmp_path):
    import shutil

    index_dir, _ = built
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model_dir, moved)
    hits = json_lines(clap("search", "rain", "--index", index_dir, "--model", moved, "--json", "-k", "2").stdout)
    assert len(hits) == 2


def test_deleted_file_behind_a_symlinked_folder_is_pruned(tiny_model_dir, tmp_path):
    outside = tmp_path / "external"
    make_library(outside, good=GOOD[:2])
    root = tmp_path / "lib"
    root.mkdir()
    (root / "ext").symlink_to(outside, target_is_directory=True)
    index_dir = tmp_path / "idx"
    first = json_lines(clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--json").stdout)[-1]
    assert first["added"] == 2
    gone = outside / GOOD[0][0]
    gone.unlink()
    again = json_lines(clap("index", root, "--index", index_dir, "--json").stdout)[-1]
    assert again["removed"] == 1 and str(gone.resolve()) not in index_contents(index_dir)


# ---------------------------------------------------------------- --not terms, on hand-built embeddings

DOG, RAIN, OTHER = np.eye(3, dtype=np.float32)  # what the fake model embeds each word as
FAKE_IDENTITY = {"model": "fake", "weights_sha256": "0" * 64, "dim": 3}


class FakeModel:
    """Stands in for a loaded model: each text embeds as a chosen vector."""

    identity_dict = FAKE_IDENTITY
    vectors = {"dog": DOG, "rain": RAIN, "other": OTHER}

    def embed_text(self, texts):
        return np.stack([self.vectors[t] for t in texts])  # (n, 3)


def unit(v):
    return (v / np.linalg.norm(v)).astype(np.float32)


def test_query_vector_is_the_normalised_sum_of_positives_minus_negatives():
    from clapcli.index.search import query_vector

    q = query_vector(FakeModel(), ["dog", "other"], ["rain"])
    np.testing.assert_allclose(q, unit(DOG + OTHER - RAIN), atol=1e-6)
    np.testing.assert_allclose(query_vector(FakeModel(), ["dog"], ["rain", "other"]), unit(DOG - RAIN - OTHER),
                               atol=1e-6)


def test_not_term_pushes_its_files_down(tmp_path, monkeypatch):
    """Through the real `clap search`: a file that matches the query *and* the --not term drops below one that
    matches the query alone, with the cosines of normalise(dog − rain)."""
    from clapcli.cli import options
    from clapcli.index.store import IndexStore

    files = {"dog_in_rain.wav": unit(DOG + RAIN), "dog.wav": unit(0.6 * DOG + 0.8 * OTHER), "rain.wav": RAIN}
    index_dir = tmp_path / "idx"
    with IndexStore.open(index_dir, create=True) as store:
        store.set_model_identity(FAKE_IDENTITY)
        for name, vector in files.items():
            store.upsert_file(f"/lib/{name}", 1, 1, name, 1.0, 48_000, 1, [(0.0, 1.0, "file", vector)])
    monkeypatch.setattr(options, "load", lambda *args, **kwargs: FakeModel())

    def ranked(*args):
        hits = json_lines(clap("search", *args, "--index", index_dir, "--json").stdout)
        return [(Path(h["path"]).name, h["score"]) for h in hits]

    plain = ranked("dog")
    assert [name for name, _ in plain] == ["dog_in_rain.wav", "dog.wav", "rain.wav"]
    pushed = ranked("dog", "--not", "rain")
    assert [name for name, _ in pushed] == ["dog.wav", "dog_in_rain.wav", "rain.wav"]
    q = unit(DOG - RAIN)
    for name, score in pushed:
        assert score == pytest.approx(float(files[name] @ q), abs=1e-5)
