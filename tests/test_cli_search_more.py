"""`clap search` beyond one hit per file, through the real CLI on a tiny random model: files gone from disk,
several matching windows of a long take (--per-file), query by example leaving itself out (--include-self),
--not-audio, audio lines on --stdin, and indexed examples answered from their stored vectors (no model load).

The library: four 1 s clips and one 60 s take made of six 10 s windows A A B C A D (48 kHz float WAV, so an
excerpt written with `write_window_query` embeds exactly as the stored window).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli.cli.main import app
from library import stored, write_window_query

WINDOW = 480_000  # samples in a 10 s window at 48 kHz
CLIPS = ["a.wav", "b.wav", "c.wav", "d.wav"]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def make_clips(folder: Path) -> dict[str, str]:
    """Four different 1 s clips: {name: resolved path}."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(CLIPS):
        write_audio(folder / name, tone_noise(1.0, 48_000, seed=10 + i), 48_000)
    return {name: str((folder / name).resolve()) for name in CLIPS}


@pytest.fixture(scope="module")
def lib(tiny_model_dir, tmp_path_factory):
    """(library folder, index dir, {clip name: path}, take path, query file = window A, stored vectors by path)."""
    base = tmp_path_factory.mktemp("more").resolve()
    root = base / "lib"
    clips = make_clips(root / "clips")
    a, b, c, d = (tone_noise(10.0, 48_000, seed=s) for s in (31, 32, 33, 34))
    take = root / "long" / "take.wav"
    take.parent.mkdir()
    write_window_query(take, np.concatenate([a, a, b, c, a, d]))
    query = base / "query_a.wav"
    write_window_query(query, a)
    index_dir = base / "idx"
    clap("index", root, "--index", index_dir, "--model", tiny_model_dir, "--workers", "0")
    vectors = {p: np.frombuffer(v, np.float32) for p, v in stored(index_dir).items()}
    return root, index_dir, clips, str(take.resolve()), query, vectors


def assert_scored_by(hits: list[dict], q: np.ndarray, vectors: dict) -> None:
    """Each clip scores the cosine of its vector and the query `q`; the take scores its best segment, so at
    least its file-level vector's."""
    for h in hits:
        expected = float(vectors[h["path"]] @ q)
        if h["path"].endswith("take.wav"):
            assert h["score"] >= expected - 1e-5
        else:
            assert h["score"] == pytest.approx(expected, abs=1e-5)


def search(index_dir, *args, input: str | None = None) -> list[dict]:
    result = CliRunner().invoke(app, ["search", *map(str, args), "--index", str(index_dir), "--json"], input=input)
    assert result.exit_code == 0, (result.output, result.exception)
    return json_lines(result.stdout)


def count_loads(monkeypatch) -> list[bool]:
    """Record each model load (its text_only flag); the loads still happen."""
    from clapcli.cli import options

    loads, load = [], options.load
    monkeypatch.setattr(options, "load", lambda *a, **kw: loads.append(kw.get("text_only")) or load(*a, **kw))
    return loads


def on_a_terminal(monkeypatch) -> None:
    from rich.console import Console

    from clapcli.cli import output

    monkeypatch.setattr(output, "is_terminal", lambda: True)
    monkeypatch.setattr(output, "stdout_console", lambda: Console(force_terminal=True, color_system=None, width=300))


def test_a_file_gone_from_disk_is_flagged_and_left_out_of_paths(tiny_model_dir, tmp_path, monkeypatch):
    clips = make_clips(tmp_path / "lib")
    index_dir = tmp_path / "idx"
    clap("index", tmp_path / "lib", "--index", index_dir, "--model", tiny_model_dir, "--workers", "0")
    os.unlink(clips["b.wav"])
    hits = search(index_dir, "rain", "-k", "10")
    assert {h["path"]: h["missing"] for h in hits} == {p: n == "b.wav" for n, p in clips.items()}

    result = clap("search", "rain", "--index", index_dir, "--paths", "-k", "10")
    assert sorted(result.stdout.split()) == sorted(p for n, p in clips.items() if n != "b.wav")
    assert "left out 1 file gone from disk" in result.stderr
    ranked = [h["path"] for h in hits if not h["missing"]]
    top = clap("search", "rain", "--index", index_dir, "--paths", "-k", "3").stdout.split()
    assert top == ranked  # -k counts the files that are there: three paths out of the three left
    assert all(os.path.isfile(p) for p in top)

    on_a_terminal(monkeypatch)
    table = clap("search", "rain", "--index", index_dir, "-k", "10").stdout
    assert [line for line in table.splitlines() if "(missing)" in line] == \
        [line for line in table.splitlines() if "b.wav" in line]
    assert "gone from disk since indexed" in table


def test_per_file_gives_the_matching_windows_of_a_long_take_as_merged_ranges(lib, monkeypatch):
    _, index_dir, _, take, query, _ = lib
    one = search(index_dir, "--audio", query, "-k", "1")[0]
    assert one["path"] == take and one["score"] == pytest.approx(1.0, abs=1e-4)
    assert (one["start"], one["end"]) in {(0.0, 10.0), (10.0, 20.0), (40.0, 50.0)}  # one of the three A windows
    assert [(r["start"], r["end"]) for r in one["ranges"]] == [(one["start"], one["end"])]

    hit = search(index_dir, "--audio", query, "-k", "1", "--per-file", "3")[0]
    assert (hit["start"], hit["end"]) == (one["start"], one["end"])  # start/end stay the best window
    assert sorted((r["start"], r["end"]) for r in hit["ranges"]) == [(0.0, 20.0), (40.0, 50.0)]  # A A merged
    assert all(r["score"] == pytest.approx(1.0, abs=1e-4) for r in hit["ranges"])

    # a window after the best one counts only when it reaches --min-score: the three A windows, not B C D
    cut = search(index_dir, "--audio", query, "-k", "1", "--per-file", "6", "--min-score", "0.9999")[0]
    assert sorted((r["start"], r["end"]) for r in cut["ranges"]) == [(0.0, 20.0), (40.0, 50.0)]
    every = search(index_dir, "--audio", query, "-k", "1", "--per-file", "6")[0]
    assert [(r["start"], r["end"]) for r in every["ranges"]] == [(0.0, 60.0)]
    assert every["ranges"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    on_a_terminal(monkeypatch)
    table = clap("search", "--audio", query, "--index", index_dir, "-k", "1", "--per-file", "3").stdout
    assert "0:00.00–0:20.00" in table and "0:40.00–0:50.00" in table


def test_an_indexed_example_leaves_itself_out_unless_include_self(lib):
    _, index_dir, clips, take, _, _ = lib
    hits = search(index_dir, "--audio", clips["a.wav"], "-k", "10")
    assert len(hits) == 4 and clips["a.wav"] not in {h["path"] for h in hits}
    assert [h["rank"] for h in hits] == [1, 2, 3, 4]
    with_self = search(index_dir, "--audio", clips["a.wav"], "-k", "10", "--include-self")
    assert with_self[0]["path"] == clips["a.wav"] and with_self[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["path"] for h in with_self[1:]] == [h["path"] for h in hits]
    both = search(index_dir, "--audio", clips["a.wav"], "--audio", take, "-k", "10")  # neither example comes back
    assert {h["path"] for h in both} == {clips[n] for n in ("b.wav", "c.wav", "d.wav")}


def test_not_audio_pushes_the_sound_of_a_file_away(lib, tiny_model_dir):
    from clapcli import load_model

    _, index_dir, clips, _, _, vectors = lib
    a, b = clips["a.wav"], clips["b.wav"]
    plain = search(index_dir, "--audio", a, "-k", "10")
    pushed = search(index_dir, "--audio", a, "--not-audio", b, "-k", "10")
    q = unit(vectors[a] - vectors[b])
    assert_scored_by(pushed, q, vectors)
    assert pushed[-1]["path"] == b
    assert pushed[-1]["score"] < next(h["score"] for h in plain if h["path"] == b) - 0.1
    assert pushed[0]["query"] == {"text": [], "not": [], "audio": [a], "not_audio": [b]}
    # the search box reads `- FILE` as --not-audio, as `FILE` alone is --audio
    result = clap("search", a, "-", b, "--index", index_dir, "--json", "-k", "10")
    assert json_lines(result.stdout) == pushed
    assert "as with --not-audio" in result.stderr
    text = search(index_dir, "rain", "--not-audio", b, "-k", "10")
    q = unit(load_model(tiny_model_dir, device="cpu", precision="fp32").embed_text(["rain"])[0] - vectors[b])
    assert text[0]["query"]["not_audio"] == [b] and b in {h["path"] for h in text}  # (a text search keeps b)
    assert_scored_by(text, q, vectors)


def test_stdin_answers_audio_lines_from_one_model_load(lib, tmp_path, monkeypatch):
    _, index_dir, clips, _, query, vectors = lib
    a, b, c = clips["a.wav"], clips["b.wav"], clips["c.wav"]
    loads = count_loads(monkeypatch)
    lines = ["rain", json.dumps({"audio": a}), json.dumps({"audio": [a, b], "not_audio": c, "k": 2}),
             json.dumps({"audio": str(tmp_path / "nope.wav")}), json.dumps({"not": "rain"}),
             json.dumps({"query": "rain", "audio": a, "not": "wind"}), json.dumps({"audio": 5})]
    result = CliRunner().invoke(app, ["search", "--stdin", "--index", str(index_dir), "--json", "-k", "10"],
                                input="\n".join(lines) + "\n")
    assert result.exit_code == 1, result.output  # three lines were refused, the others answered
    out = json_lines(result.stdout)
    assert [o.get("query") for o in out] == ["rain", None, None, None, None, "rain", None]
    alone = [{k: v for k, v in h.items() if k != "query"} for h in search(index_dir, "--audio", a, "-k", "10")]
    assert out[1]["audio"] == [a] and out[1]["results"] == alone  # as on the command line, itself left out
    assert [len(o.get("results", [])) for o in out] == [5, 4, 2, 0, 0, 4, 0]
    q = unit(vectors[a] + vectors[b] - vectors[c])
    assert out[2]["not_audio"] == [c] and out[2]["k"] == 2
    assert not {a, b} & {h["path"] for h in out[2]["results"]}
    assert_scored_by(out[2]["results"], q, vectors)
    assert out[3]["line"] == 4 and "no such file" in out[3]["error"]
    assert out[4]["line"] == 5 and '"audio"' in out[4]["error"]
    assert out[5]["not"] == ["wind"] and out[6]["line"] == 7 and '"audio" must be' in out[6]["error"]
    assert loads == [True]  # the text half, once: the indexed examples brought their stored vectors

    more = CliRunner().invoke(app, ["search", "--stdin", "--index", str(index_dir), "--json", "-k", "1"],
                              input=json.dumps({"audio": str(query)}) + "\n" + json.dumps({"audio": str(query)}))
    assert more.exit_code == 0, more.output
    assert [o["results"][0]["score"] for o in json_lines(more.stdout)] == [pytest.approx(1.0, abs=1e-4)] * 2
    assert loads == [True, True, False]  # then the whole model, once, for the example that is not in the index


def test_an_indexed_example_is_answered_from_its_stored_vector_without_a_model(lib, tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    from clapcli import load_model
    from clapcli.cli import options

    _, index_dir, clips, take, _, vectors = lib
    copy = tmp_path / "take_copy.wav"  # the same sound outside the index: embedded by the model
    shutil.copyfile(take, copy)
    embedded = search(index_dir, "--audio", copy, "-k", "10")
    monkeypatch.setattr(options, "load", lambda *a, **kw: pytest.fail("a model was loaded"))
    from_index = search(index_dir, "--audio", take, "-k", "10", "--include-self")
    assert [h["path"] for h in from_index] == [h["path"] for h in embedded]
    for mine, theirs in zip(from_index, embedded):
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-4)
        assert (mine["start"], mine["end"]) == (theirs["start"], theirs["end"])

    monkeypatch.undo()
    loads = count_loads(monkeypatch)
    mixed = search(index_dir, "rain", "--audio", clips["a.wav"], "-k", "10")
    assert loads == [True]  # the text half for the text, the stored vector for the file
    text = load_model(tiny_model_dir, device="cpu", precision="fp32").embed_text(["rain"])[0]
    q = unit(text + vectors[clips["a.wav"]])
    assert_scored_by(mixed, q, vectors)

    st = os.stat(clips["a.wav"])
    os.utime(clips["a.wav"], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        again = search(index_dir, "--audio", clips["a.wav"], "-k", "10")
    finally:
        os.utime(clips["a.wav"], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert loads == [True, False]  # a changed file is embedded as any other (and still leaves itself out)
    assert clips["a.wav"] not in {h["path"] for h in again}
