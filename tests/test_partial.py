"""Truncated files decode what can be decoded and are recorded as `partial` with the reason, every format
alike; a file with nothing decodable stays an error; what C decoders print goes to the debug log."""

from __future__ import annotations

import ctypes
import json
import logging
import sqlite3

import numpy as np
import pytest

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli import load_model
from clapcli.audio.decode import captured_stderr, load_audio, read_mono
from clapcli.errors import AudioDecodeError
from clapcli.index import schema as schema_mod
from clapcli.index.schema import DB_FILENAME
from clapcli.index.store import IndexStore

FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", None), "mp3": ("MP3", None), "ogg": ("OGG", None)}


def _truncated(folder, ext: str, seconds: float, keep: float = 0.6, seed: int = 0) -> str:
    """An encoded file cut to `keep` of its bytes (headers intact, the stream broken off)."""
    fmt, subtype = FORMATS[ext]
    full = folder / f"full_{ext}_{seed}.{ext}"
    write_audio(full, tone_noise(seconds, 44_100, channels=2, seed=seed), 44_100, format=fmt, subtype=subtype)
    blob = full.read_bytes()
    full.unlink()
    cut = folder / f"cut_{seed}.{ext}"
    cut.write_bytes(blob[: int(len(blob) * keep)])
    return str(cut)


@pytest.mark.parametrize("ext", sorted(FORMATS))
def test_a_truncated_file_decodes_in_part_with_the_reason(tmp_path, ext, capfd):
    path = _truncated(tmp_path, ext, 4.0)
    mono, info = read_mono(path)
    assert info.partial and "truncated" in info.partial, info.partial
    assert 0.3 * 4.0 * 44_100 < len(mono) < 0.9 * 4.0 * 44_100
    whole = tmp_path / f"whole.{ext}"
    write_audio(whole, tone_noise(4.0, 44_100, seed=1), 44_100, format=FORMATS[ext][0], subtype=FORMATS[ext][1])
    assert read_mono(whole)[1].partial is None
    assert capfd.readouterr().err == ""  # mpg123's "Xing stream size off …" did not reach stderr


def test_nothing_decodable_is_still_an_error(tmp_path):
    path = tmp_path / "head.flac"
    blob = open(write_audio(tmp_path / "w.flac", tone_noise(3.0, 44_100, seed=2), 44_100), "rb").read()
    path.write_bytes(blob[:200])
    with pytest.raises(AudioDecodeError):
        load_audio(path)


def test_c_level_stderr_goes_to_the_debug_log(tmp_path, capfd, caplog):
    libc = ctypes.CDLL(None)
    messages: list[str] = []
    with captured_stderr(messages):
        libc.write(2, b"Warning: from C, straight to fd 2\n", 34)
    assert messages == ["Warning: from C, straight to fd 2"]
    assert capfd.readouterr().err == ""
    libc.write(2, b"after\n", 6)  # fd 2 is restored
    assert capfd.readouterr().err == "after\n"
    # a truncated MP3 makes mpg123 complain on stderr: the complaint lands in the debug log instead
    path = _truncated(tmp_path, "mp3", 3.0, keep=0.5)
    with caplog.at_level(logging.DEBUG, logger="clapcli.audio"):
        read_mono(path)
    assert capfd.readouterr().err == ""
    assert any("Xing" in r.getMessage() and path in r.getMessage() for r in caplog.records), caplog.records


@pytest.mark.parametrize("ext", ["flac", "mp3", "wav"])
def test_a_truncated_long_file_embeds_what_decodes(tmp_path, ext, tiny_model_dir):
    """The streamed path (header length wrong: the fusion stack is rebuilt on a second pass) equals the
    whole-file path on the decoded part."""
    path = _truncated(tmp_path, ext, 30.0, keep=0.7)
    m = load_model(tiny_model_dir, device="cpu")
    (got,) = m.embed_files([path], segments=True)
    whole = m.embed_waveforms([load_audio(path)], segments=True)[0]
    assert got.error is None and got.partial and "truncated" in got.partial
    assert 15.0 < got.duration < 25.0 and got.duration == pytest.approx(whole.duration)
    assert np.allclose(got.embedding, whole.embedding, atol=2e-5)
    assert len(got.segments) == len(whole.segments) >= 2


@pytest.fixture(scope="module")
def damaged_library(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    write_audio(root / "good.wav", tone_noise(2.0, 44_100, seed=3), 44_100)
    for seed, ext in enumerate(["wav", "flac", "mp3"], start=10):
        _truncated(root, ext, 16.0, keep=0.8, seed=seed)  # still longer than 10 s: windows
    (root / "garbage.wav").write_bytes(b"RIFF" + bytes(200))
    return root


def test_index_records_partial_files_and_counts_them(damaged_library, tiny_model_dir, tmp_path):
    index_dir = tmp_path / "idx"
    res = clap("index", damaged_library, "--index", index_dir, "--model", tiny_model_dir, "--json")
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["added"] == 4 and summary["skipped"] == 1  # the garbage file stays an error
    assert summary["partial"] == 3 and summary["total_partial"] == 3 and summary["total_files"] == 4
    reasons = {p["path"].rsplit("/", 1)[-1]: p["reason"] for p in summary["partial_files"]}
    assert set(reasons) == {"cut_10.wav", "cut_11.flac", "cut_12.mp3"}
    assert all("truncated" in r for r in reasons.values()), reasons
    with IndexStore.open(index_dir, readonly=True) as store:
        states = {p.rsplit("/", 1)[-1]: r.status for p, r in store.file_states().items()}
        assert states == {"good.wav": "ok", "cut_10.wav": "partial", "cut_11.flac": "partial",
                          "cut_12.mp3": "partial", "garbage.wav": "error"}
        assert store.counts().ok_files == 4
    again = json.loads(clap("index", damaged_library, "--index", index_dir, "--json").stdout.splitlines()[-1])
    assert again["unchanged"] == 5 and again["added"] == 0 and again["total_partial"] == 3
    human = clap("index", damaged_library, "--index", index_dir)
    assert "3 partly decoded" in human.stderr


def test_tag_and_embed_json_carry_the_partial_reason(damaged_library, tiny_model_dir):
    cut, good = damaged_library / "cut_11.flac", damaged_library / "good.wav"
    tags = [json.loads(line) for line in
            clap("tag", cut, good, "--labels", "dog,rain", "--json", "--timeline", "--model", tiny_model_dir)
            .stdout.splitlines()]
    assert "truncated" in tags[0]["partial"] and tags[0]["labels"] and tags[0]["timeline"]
    assert "partial" not in tags[1]
    emb = [json.loads(line)
           for line in clap("embed", cut, good, "--json", "--model", tiny_model_dir).stdout.splitlines()]
    assert "truncated" in emb[0]["partial"] and len(emb[0]["embedding"]) == 24 and "partial" not in emb[1]


def test_schema_2_migration_allows_partial_and_keeps_every_segment(tmp_path, monkeypatch):
    index_dir = tmp_path / "v1"
    vec = np.ones(4, np.float32) / 2
    monkeypatch.setattr(schema_mod, "MIGRATIONS", schema_mod.MIGRATIONS[:1])
    with IndexStore.open(index_dir, create=True) as s:  # rows written as version 1 wrote them
        con = s._conn
        con.execute("INSERT INTO meta (key, value) VALUES ('dim', '4')")
        con.execute("INSERT INTO files (id, path, size, mtime_ns, content_hash, duration, sample_rate, channels, "
                    "status, error, indexed_at) VALUES (1, '/a.wav', 1, 1, 'h', 20.0, 48000, 1, 'ok', NULL, 0)")
        for seg, (start, end, kind) in enumerate([(0.0, 20.0, "file"), (0.0, 10.0, "window")], start=1):
            con.execute('INSERT INTO segments (id, file_id, start, "end", kind) VALUES (?, 1, ?, ?, ?)',
                        (seg, start, end, kind))
            con.execute("INSERT INTO embeddings (segment_id, vector) VALUES (?, ?)", (seg, vec.tobytes()))
        con.commit()
        with pytest.raises(sqlite3.IntegrityError):  # version 1 refuses the new status
            con.execute("INSERT INTO files (path, size, mtime_ns, status, indexed_at) "
                        "VALUES ('/b.wav', 1, 1, 'partial', 0)")
    monkeypatch.undo()
    with IndexStore.open(index_dir) as s:
        assert s._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(len(schema_mod.MIGRATIONS))
        assert s.counts().segments == 2 and s.counts().embeddings == 2
        s.upsert_file("/b.wav", 1, 1, "h", 5.0, 48_000, 1, [(0.0, 5.0, "file", vec)], partial="cut short")
        assert [(r.path, r.status, r.error) for r in s.partial_files()] == [("/b.wav", "partial", "cut short")]
        assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert (index_dir / DB_FILENAME).is_file()
