"""`clap shards make|info` and the shard reader: round trips, splits, interruption, LAION's own format, checks."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from audio_synth import tone_noise, write_audio
from clapcli.audio.decode import load_audio
from clapcli.cli.main import app, main
from clapcli.errors import DataError
from clapcli.data.shards import RawSample, decode_audio, iter_shard, read_sizes, resolve_split, select_text

runner = CliRunner()


def _make(args: list[str]):
    res = runner.invoke(app, ["shards", "make", *args, "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run `clap ARGS` in this process through the real entry point; (exit code, stdout + stderr)."""
    monkeypatch.setattr(sys, "argv", ["clap", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    captured = capsys.readouterr()
    return exc.value.code, captured.out + captured.err


def _read_all(split_dir: Path) -> list:
    split = resolve_split(split_dir)
    return [raw for url in split.urls for raw in iter_shard(url)]


@pytest.fixture
def clips(tmp_path) -> list[dict]:
    """Seven short clips of different rates, channel counts and formats, with captions and tags in a CSV."""
    return _write_clips(tmp_path)


def _write_clips(base: Path) -> list[dict]:
    folder = base / "src" / "audio"
    folder.mkdir(parents=True)
    specs = [
        ("dog.bark.wav", 48_000, 1, 0.6, "a dog barks", None),
        ("rain.flac", 44_100, 2, 1.1, ["rain on a roof", "steady rain"], ["rain", "water"]),
        ("siren.wav", 22_050, 1, 0.4, "a siren wails", ["siren"]),
        ("bird song.ogg", 32_000, 1, 0.8, "birds sing", None),
        ("engine.wav", 16_000, 2, 0.5, "an engine idles", ["engine"]),
        ("wind.flac", 48_000, 1, 0.3, "wind blows", None),
        ("kick.wav", 48_000, 1, 0.2, "a kick drum", ["drum", "kick"]),
    ]
    out = []
    for i, (name, sr, ch, seconds, caption, tags) in enumerate(specs):
        path = write_audio(folder / name, tone_noise(seconds, sr, channels=ch, seed=i), sr)
        out.append({"path": Path(path), "rel": f"audio/{name}", "caption": caption, "tags": tags})
    return out


def _write_csv(path: Path, clips, tags_as="json") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "tags"])
        for c in clips:
            caption = json.dumps(c["caption"]) if isinstance(c["caption"], list) else c["caption"]
            tags = "" if not c["tags"] else (json.dumps(c["tags"]) if tags_as == "json" else ";".join(c["tags"]))
            w.writerow([c["rel"], caption, tags])
    return path


@dataclass
class RoundTrip:
    """`clap shards make` of the seven clips, three to a shard, and everything read back."""

    clips: list[dict]
    summary: dict
    train: Path  # the train/ split folder
    split: object  # resolve_split of the make output folder
    samples: list


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory) -> RoundTrip:
    base = tmp_path_factory.mktemp("round-trip")
    clips = _write_clips(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLAP_HOME", str(base / "clap-home"))  # isolated as conftest's per-test clap_home, not active yet
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.delenv("CLAP_MODEL", raising=False)
        manifest = _write_csv(base / "src" / "manifest.csv", clips, tags_as="semicolons")
        summary = _make([str(manifest), "--out", str(base / "shards"), "--shard-size", "3"])
    split = resolve_split(base / "shards")  # the make output folder itself: its train/ split
    return RoundTrip(clips, summary, base / "shards" / "train", split, _read_all(base / "shards"))


def test_round_trip_summary_counts_every_clip_in_shards_of_three(round_trip):
    summary, clips = round_trip.summary, round_trip.clips
    assert summary["samples"] == len(clips) and summary["skipped"] == []
    assert summary["splits"]["train"]["shards"] == 3  # 3 + 3 + 1


def test_round_trip_writes_numbered_tars_and_their_sizes(round_trip):
    train = round_trip.train
    assert sorted(p.name for p in train.iterdir()) == ["000000.tar", "000001.tar", "000002.tar", "sizes.json"]
    assert read_sizes(train) == {"000000.tar": 3, "000001.tar": 3, "000002.tar": 1}


def test_round_trip_output_folder_resolves_to_its_train_split(round_trip):
    split, train, clips = round_trip.split, round_trip.train, round_trip.clips
    assert split.directory == train and split.num_samples == len(clips) and split.val_dir is None
    assert split.urls == sorted(split.urls) and list(split.sizes.values()) == [3, 3, 1]


def test_round_trip_keeps_every_caption_tag_and_original_path_in_order(round_trip):
    samples, clips = round_trip.samples, round_trip.clips
    assert len(samples) == len(clips)
    for raw, clip in zip(samples, clips):
        assert "." not in raw.key and raw.audio_ext == "flac"
        assert raw.meta["text"] == clip["caption"]
        assert raw.meta.get("tag") == clip["tags"]
        assert Path(raw.meta["original_path"]) == clip["path"].resolve()


def test_round_trip_audio_is_the_source_resampled_to_48k_mono_16_bit(round_trip):
    for raw, clip in zip(round_trip.samples, round_trip.clips):
        audio = decode_audio(raw)
        expected = load_audio(clip["path"])
        assert audio.dtype == np.float32 and audio.shape == expected.shape
        np.testing.assert_allclose(audio, expected, rtol=0, atol=1 / 32767 + 1e-7)
        assert raw.meta["duration"] == pytest.approx(len(expected) / 48_000, abs=1e-5)
        info = sf.info(io.BytesIO(raw.audio_bytes))
        assert (info.samplerate, info.channels, info.subtype) == (48_000, 1, "PCM_16")


def test_round_trip_hours_sum_the_durations_and_keys_are_unique(round_trip):
    summary, samples = round_trip.summary, round_trip.samples
    total = 0.0
    for raw in samples:
        total += raw.meta["duration"]
    assert summary["hours"] == pytest.approx(total / 3600, abs=1e-6)
    assert len({raw.key for raw in samples}) == len(samples)


def test_round_trip_tar_members_are_adjacent_pairs_in_order(round_trip):
    split, samples = round_trip.split, round_trip.samples
    # members are adjacent pairs, in order, in the tar itself
    with tarfile.open(split.urls[0]) as tar:
        names = tar.getnames()
    assert names == [f"{samples[i].key}.{ext}" for i in range(3) for ext in ("flac", "json")]


def test_webdataset_library_reads_the_shards(tmp_path, clips):
    import webdataset as wds  # in the test extra: a missing library fails here, not skips
    manifest = _write_csv(tmp_path / "src" / "m.csv", clips)
    _make([str(manifest), "--out", str(tmp_path / "shards"), "--shard-size", "4"])
    split = resolve_split(tmp_path / "shards")
    got = [(s["__key__"], json.loads(s["json"])["text"]) for s in wds.WebDataset(split.urls, shardshuffle=False)]
    assert [t for _, t in got] == [c["caption"] for c in clips]
    assert [k for k, _ in got] == [raw.key for raw in _read_all(tmp_path / "shards")]


def test_jsonl_manifest_folder_with_sidecars_and_folder_with_captions(tmp_path, clips):
    src = tmp_path / "src"
    with open(src / "m.jsonl", "w") as f:
        for c in clips:
            f.write(json.dumps({"path": str(c["path"]) if c is clips[0] else c["rel"], "text": c["caption"],
                                **({"tags": c["tags"]} if c["tags"] else {})}) + "\n")
    samples = _make([str(src / "m.jsonl"), "--out", str(tmp_path / "a")])
    assert samples["samples"] == len(clips)
    assert [r.meta["text"] for r in _read_all(tmp_path / "a")] == [c["caption"] for c in clips]

    # sidecars: x.txt (several lines -> list) and x.json with tags; a clip with none is skipped
    folder = src / "audio"
    (folder / "dog.bark.txt").write_text("a dog barks\nbarking\n")
    (folder / "rain.json").write_text(json.dumps({"caption": "rain", "tags": ["rain", "water"]}))
    (folder / "siren.txt").write_text("a siren\n")
    summary = _make([str(folder), "--out", str(tmp_path / "b")])
    got = {Path(r.meta["original_path"]).name: (r.meta["text"], r.meta.get("tag"))
           for r in _read_all(tmp_path / "b")}
    assert got == {"dog.bark.wav": (["a dog barks", "barking"], None), "rain.flac": ("rain", ["rain", "water"]),
                   "siren.wav": ("a siren", None)}
    assert len(summary["skipped"]) == len(clips) - 3
    assert all("no caption" in s["reason"] for s in summary["skipped"])

    # --captions: a manifest whose relative paths resolve against the folder; files without a row skipped
    rows = [dict(c, rel=Path(c["rel"]).name) for c in clips[:4]]
    manifest = _write_csv(tmp_path / "captions.csv", rows)
    summary = _make([str(folder), "--captions", str(manifest), "--out", str(tmp_path / "c")])
    assert sorted(r.meta["text"] if isinstance(r.meta["text"], str) else r.meta["text"][0]
                  for r in _read_all(tmp_path / "c")) == sorted(["a dog barks", "rain on a roof", "a siren wails",
                                                                  "birds sing"])
    assert len(summary["skipped"]) == len(clips) - 4


def test_bad_files_are_skipped_with_reasons_and_tags_need_a_caption_mode(tmp_path, clips, monkeypatch, capsys):
    src = tmp_path / "src"
    (src / "audio" / "broken.wav").write_bytes(b"RIFF not really audio")
    rows = [*clips[:2], {"rel": "audio/broken.wav", "caption": "broken", "tags": None},
            {"rel": "audio/missing.wav", "caption": "gone", "tags": None},
            {"rel": "audio/siren.wav", "caption": "", "tags": ["siren"]}]
    manifest = _write_csv(src / "m.csv", rows)
    summary = _make([str(manifest), "--out", str(tmp_path / "s")])
    reasons = {Path(s["path"]).name: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"broken.wav", "missing.wav", "siren.wav"}
    assert "not found" in reasons["missing.wav"] and "--captions-from-tags" in reasons["siren.wav"]
    assert summary["samples"] == 2

    summary = _make([str(manifest), "--out", str(tmp_path / "t"), "--captions-from-tags", "template"])
    texts = [r.meta["text"] for r in _read_all(tmp_path / "t")]
    assert texts[-1] == "The sound of siren" and summary["samples"] == 3

    # an output that already holds shards is refused (exit 2), nothing is overwritten
    before = (tmp_path / "t" / "train" / "000000.tar").read_bytes()
    code, text = _cli(monkeypatch, capsys, "shards", "make", str(manifest), "--out", str(tmp_path / "t"))
    assert code == 2 and "already holds shards" in text
    assert (tmp_path / "t" / "train" / "000000.tar").read_bytes() == before


def test_val_split_sizes_disjoint_and_seeded(tmp_path, clips):
    manifest = _write_csv(tmp_path / "src" / "m.csv", clips)

    def split(seed, out):
        summary = _make([str(manifest), "--out", str(tmp_path / out), "--val-fraction", "0.3",
                         "--seed", str(seed), "--shard-size", "2"])
        train = [r.meta["original_path"] for r in _read_all(tmp_path / out / "train")]
        val = [r.meta["original_path"] for r in _read_all(tmp_path / out / "val")]
        return summary, train, val

    summary, train, val = split(0, "a")
    assert len(val) == round(len(clips) * 0.3) == summary["splits"]["val"]["samples"]
    assert len(train) == len(clips) - len(val) == summary["splits"]["train"]["samples"]
    assert not set(train) & set(val) and set(train) | set(val) == {str(c["path"].resolve()) for c in clips}
    order = [str(c["path"].resolve()) for c in clips]
    assert train == [p for p in order if p in train] and val == [p for p in order if p in val]  # kept in order
    assert resolve_split(tmp_path / "a").val_dir == tmp_path / "a" / "val"
    assert sum(read_sizes(tmp_path / "a" / "val").values()) == len(val)
    assert split(0, "b")[2] == val
    assert any(split(s, f"c{s}")[2] != val for s in (1, 2, 3))


def test_failure_mid_run_leaves_only_complete_shards(tmp_path, clips, monkeypatch):
    import clapcli.data.shard_writer as shards

    manifest = _write_csv(tmp_path / "src" / "m.csv", clips)
    real, calls = shards.encode_flac, []

    def failing(samples, *a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # Ctrl-C while the second shard is being built
        return real(samples, *a, **k)

    monkeypatch.setattr(shards, "encode_flac", failing)
    res = runner.invoke(app, ["shards", "make", str(manifest), "--out", str(tmp_path / "s"), "--shard-size", "2",
                              "--workers", "0"])
    assert res.exit_code != 0
    train = tmp_path / "s" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["000000.tar", "sizes.json"]  # the temporary is gone
    assert [r.meta["text"] for r in _read_all(train)] == [c["caption"] for c in clips[:2]]
    assert runner.invoke(app, ["shards", "info", str(tmp_path / "s")]).exit_code == 0


def test_sigkill_mid_run_leaves_no_shard_a_reader_accepts_half_written(tmp_path, clips):
    """A real process killed with SIGKILL while a shard is being built (encoding slowed down to make room)."""
    manifest = _write_csv(tmp_path / "src" / "m.csv", clips)
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys, time
        import clapcli.data.shard_writer as shards
        real = shards.encode_flac
        def slow(samples, *a, **k):
            time.sleep(0.4)
            return real(samples, *a, **k)
        shards.encode_flac = slow
        sys.argv = ["clap", "shards", "make", {str(manifest)!r}, "--out", {str(out)!r}, "--shard-size", "2",
                    "--workers", "0"]
        from clapcli.cli.main import main
        main()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    train = out / "train"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (train / "000000.tar").exists() and list(train.glob("*.tar.tmp")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert list(train.glob("*.tar.tmp"))  # killed mid-shard
    split = resolve_split(out)  # every *.tar is complete and listed
    got = [r for url in split.urls for r in iter_shard(url)]
    assert len(got) == split.num_samples >= 2 and len(got) % 2 == 0
    assert [r.meta["text"] for r in got] == [c["caption"] for c in clips[:len(got)]]
    res = runner.invoke(app, ["shards", "info", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.splitlines()[0])["samples"] == len(got)


# ------------------------------------------------------------------------------------ hand-written shards


def _flac_bytes(seconds=0.5, sr=48_000, channels=1, seed=0, fmt="FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, tone_noise(seconds, sr, channels=channels, seed=seed), sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _laion_split(folder: Path) -> Path:
    """Two shards in the layout of LAION's tardir: `N.tar`, members `KEY.flac` + `KEY.json`, sizes.json."""
    folder.mkdir(parents=True)
    metas = [
        {"text": ["a man speaks", "speech"], "tag": ["Speech"], "original_data": {"title": "t0"},
         "text_augment_t5": "a person is talking", "text_augment_all": ["a man speaks", "speech",
                                                                       "a person is talking"]},
        {"text": "a dog barks", "tag": ["Dog"], "original_data": {"id": 7}},
        {"text": "The sound of Rain", "text_augment_t5": "rain falls on the ground"},
    ]
    _write_tar(folder / "0.tar", [("0.flac", _flac_bytes(seed=1)), ("0.json", json.dumps(metas[0]).encode()),
                                  ("1.flac", _flac_bytes(seed=2)), ("1.json", json.dumps(metas[1]).encode())])
    _write_tar(folder / "1.tar", [("2.wav", _flac_bytes(0.3, 44_100, 2, seed=3, fmt="WAV")),
                                  ("2.json", json.dumps(metas[2]).encode())])
    (folder / "sizes.json").write_text(json.dumps({"0.tar": 2, "1.tar": 1}))
    return folder


@pytest.fixture
def laion_split(tmp_path):
    """LAION's two hand-written shards read back: (folder, resolved split, samples in order)."""
    folder = _laion_split(tmp_path / "laion" / "train")
    split = resolve_split(folder)
    return folder, split, [r for url in split.urls for r in iter_shard(url)]


def test_reads_laion_shards_in_order_with_their_audio_extensions(laion_split):
    folder, split, samples = laion_split
    assert split.urls == [str(folder / "0.tar"), str(folder / "1.tar")] and split.num_samples == 3
    assert [r.key for r in samples] == ["0", "1", "2"]
    assert [r.audio_ext for r in samples] == ["flac", "flac", "wav"]


def test_laion_text_fields_by_caption_mode_and_other_fields_kept(laion_split):
    _, _, samples = laion_split
    a, b, c = (r.meta for r in samples)
    assert select_text(a, "text") == ["a man speaks", "speech"]
    assert select_text(a, "k2c") == ["a person is talking"]
    assert select_text(a, "all") == ["a man speaks", "speech", "a person is talking"]
    assert select_text(b, "text") == select_text(b, "k2c") == select_text(b, "all") == ["a dog barks"]
    assert select_text(c, "all") == ["The sound of Rain", "rain falls on the ground"]  # text + t5 fallback
    assert a["original_data"] == {"title": "t0"}


def test_a_sample_without_text_is_an_error_naming_its_key():
    with pytest.raises(DataError, match="k9"):
        select_text({"text": "", "tag": ["x"]}, "text", key="k9")


def test_laion_audio_decodes_like_the_front_end_mono_and_resampled_stereo(laion_split, tmp_path):
    _, _, samples = laion_split
    mono = decode_audio(samples[0])
    expected = tone_noise(0.5, 48_000, seed=1)
    np.testing.assert_allclose(mono, expected, atol=1 / 32767 + 1e-7)
    stereo = decode_audio(samples[2])  # 44.1 kHz stereo: averaged and resampled like the front end
    wav = tmp_path / "x.wav"
    wav.write_bytes(samples[2].audio_bytes)
    np.testing.assert_array_equal(stereo, load_audio(wav))
    assert len(stereo) == round(0.3 * 48_000)


def test_shards_info_of_laion_shards_counts_fields_hours_and_examples(laion_split):
    folder, _, _ = laion_split
    res = runner.invoke(app, ["shards", "info", str(folder), "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert (info["shards"], info["samples"], info["with_text"], info["with_tag"], info["with_text_augment_t5"]) \
        == (2, 3, 3, 2, 2)
    assert info["hours"] == pytest.approx((0.5 + 0.5 + 0.3) / 3600, abs=1e-6)  # from the audio headers
    assert info["examples"] == ["a man speaks", "a dog barks", "The sound of Rain"]


def test_info_reports_a_sizes_mismatch_and_names_the_shard(tmp_path, monkeypatch, capsys):
    folder = _laion_split(tmp_path / "d")
    assert _cli(monkeypatch, capsys, "shards", "info", str(folder))[0] == 0
    (folder / "sizes.json").write_text(json.dumps({"0.tar": 2, "1.tar": 4}))
    code, text = _cli(monkeypatch, capsys, "shards", "info", str(folder))
    assert code == 1
    assert "1.tar: sizes.json says 4 samples, the shard holds 1" in text
    assert "0.tar:" not in text

    (folder / "sizes.json").write_text(json.dumps({"0.tar": 2, "1.tar": 1, "2.tar": 5}))
    code, text = _cli(monkeypatch, capsys, "shards", "info", str(folder))
    assert code == 1 and "2.tar: named in sizes.json but missing" in text
    with pytest.raises(DataError, match="2.tar"):
        resolve_split(folder)


def test_missing_pair_bad_json_and_truncated_tar_name_the_shard_and_member(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "d"
    folder.mkdir()
    flac = _flac_bytes()
    _write_tar(folder / "0.tar", [("a.flac", flac), ("a.json", b'{"text": "x"}'), ("b.flac", flac),
                                  ("c.flac", flac), ("c.json", b'{"text": "y"}')])
    (folder / "sizes.json").write_text(json.dumps({"0.tar": 3}))
    with pytest.raises(DataError, match=r"0\.tar: member b\.flac has no b\.json"):
        list(iter_shard(folder / "0.tar"))
    code, text = _cli(monkeypatch, capsys, "shards", "info", str(folder))
    assert code == 1 and "0.tar: member b.flac has no b.json" in text

    _write_tar(folder / "0.tar", [("a.flac", flac), ("b.json", b'{"text": "x"}'), ("a.json", b'{"text": "y"}')])
    with pytest.raises(DataError, match="a.flac has no a.json"):  # pairs that are not adjacent
        list(iter_shard(folder / "0.tar"))

    _write_tar(folder / "0.tar", [("a.flac", flac), ("a.json", b'{"text": ')])
    with pytest.raises(DataError, match=r"a\.json is not valid JSON"):
        list(iter_shard(folder / "0.tar"))

    _write_tar(folder / "0.tar", [("a.flac", flac), ("a.json", b'{"text": "x"}'), ("b.flac", flac),
                                  ("b.json", b'{"text": "y"}')])
    whole = (folder / "0.tar").read_bytes()
    (folder / "0.tar").write_bytes(whole[: len(whole) // 2 + 100])
    with pytest.raises(DataError, match=r"0\.tar: truncated"):
        list(iter_shard(folder / "0.tar"))
    code, text = _cli(monkeypatch, capsys, "shards", "info", str(folder))
    assert code == 1 and "0.tar: truncated" in text

    # cut exactly between two samples: a shorter tar that only lacks its end-of-archive marker
    (folder / "0.tar").write_bytes(whole)
    with tarfile.open(folder / "0.tar") as tar:
        second = tar.getmember("b.flac").offset
    (folder / "0.tar").write_bytes(whole[:second])
    with pytest.raises(DataError, match=r"0\.tar: truncated tar after sample a \(no end-of-archive marker\)"):
        list(iter_shard(folder / "0.tar"))


def test_resolve_split_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        resolve_split(empty)
    folder = _laion_split(tmp_path / "x")
    (folder / "sizes.json").unlink()
    with pytest.raises(DataError, match="no sizes.json"):
        resolve_split(folder)
    (folder / "sizes.json").write_text("{not json")
    with pytest.raises(DataError, match="sizes.json"):
        resolve_split(folder)
    (folder / "sizes.json").write_text(json.dumps({"0.tar": 2}))
    with pytest.raises(DataError, match="not listed in sizes.json: 1.tar"):
        resolve_split(folder)
    with pytest.raises(DataError, match="not a folder"):
        resolve_split(tmp_path / "nope")


# ------------------------------------------------------------------------------------ memory bounded by bytes


def _split_with_a_big_member(folder: Path) -> tuple[Path, int]:
    """One shard a, b, c whose b.flac is four times the others; -> (split folder, a cap between the sizes)."""
    folder.mkdir(parents=True)
    small, big = _flac_bytes(0.5, seed=1), _flac_bytes(2.0, seed=2)
    _write_tar(folder / "0.tar", [("a.flac", small), ("a.json", b'{"text": "a"}'), ("b.flac", big),
                                  ("b.json", b'{"text": "b"}'), ("c.flac", small), ("c.json", b'{"text": "c"}')])
    (folder / "sizes.json").write_text(json.dumps({"0.tar": 3}))
    return folder, (len(small) + len(big)) // 2


def test_a_tar_member_over_the_cap_is_skipped_unread_with_a_message(tmp_path, monkeypatch, capsys):
    import clapcli.data.shards as shards
    from clapcli.eval.evaluate import _shard_waveforms

    folder, cap = _split_with_a_big_member(tmp_path / "d")
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", cap)
    a, b, c = iter_shard(folder / "0.tar")
    assert b.audio_bytes == b"" and "over the" in b.unread["flac"]  # never read into memory
    assert len(decode_audio(a)) == 24_000 and len(decode_audio(c)) == 24_000
    with pytest.raises(DataError) as info:
        decode_audio(b)
    assert (info.value.source, info.value.member) == (str(folder / "0.tar"), "b.flac")
    assert f"over the {cap} bytes a tar member may hold" in info.value.reason

    skipped = []  # evaluation skips it and says why
    model = type("M", (), {"config": type("C", (), {"frontend": type("F", (), {"sample_rate": 48_000,
                                                                              "quantize_int16": True})})})
    kept = list(_shard_waveforms(model, [str(folder / "0.tar")], lambda where, why: skipped.append((where, why))))
    assert [texts for _, texts in kept] == [["a"], ["c"]]
    assert skipped == [(f"{folder / '0.tar'}: b", info.value.reason)]

    code, text = _cli(monkeypatch, capsys, "shards", "info", str(folder))  # info lists it
    assert code == 1 and f"0.tar: b.flac: member is" in text

    _write_tar(folder / "0.tar", [("a.flac", _flac_bytes(0.1)), ("a.json", b'{"text": "' + b"x" * cap + b'"}')])
    with pytest.raises(DataError, match=r"0\.tar: a\.json: member is \d+ bytes, over the"):
        list(iter_shard(folder / "0.tar"))


def test_training_meets_an_oversized_member_as_a_data_error_naming_it(tmp_path, monkeypatch):
    import clapcli.data.shards as shards
    from clapcli.train.stream import ShardStream

    folder, cap = _split_with_a_big_member(tmp_path / "d")
    monkeypatch.setattr(shards, "MAX_MEMBER_BYTES", cap)
    split = resolve_split(folder)
    items = list(ShardStream(split, lambda waves, texts, gen: texts, batch_size=3, epoch=0, seed=0, rank=0,
                             world_size=1, workers=1, steps=1))
    assert len(items) == 1 and isinstance(items[0], DataError)
    assert str(items[0]).startswith(f"{folder / '0.tar'}: b.flac: member is") and "\n" not in str(items[0])


def test_a_sample_decoding_past_the_size_cap_or_out_of_memory_is_a_data_error(tmp_path, monkeypatch):
    from clapcli.audio import decode

    raw = RawSample("k", _flac_bytes(1.0, channels=2), "flac", {"text": "x"}, url="s/0.tar")
    assert len(decode_audio(raw)) == 48_000
    with monkeypatch.context() as m:
        m.setattr(decode, "MAX_DECODED_BYTES", 48_000 * 2 * 4 - 1)  # one byte short of the clip
        with pytest.raises(DataError) as info:
            decode_audio(raw)
    assert (info.value.source, info.value.member) == ("s/0.tar", "k.flac")
    assert info.value.reason.startswith("too large to decode whole: 48000 frames × 2 channels")

    def no_memory(*args, **kwargs):
        raise MemoryError()

    with monkeypatch.context() as m:
        m.setattr(sf.SoundFile, "read", no_memory)
        with pytest.raises(DataError) as info:
            decode_audio(raw)
    assert str(info.value) == "s/0.tar: k.flac: out of memory while decoding"
