"""`clap dedupe`: copies of one recording grouped with the right keeper; look-alikes and missing files not grouped.

The tiny random model's vectors mean nothing, so the tests pass `--threshold -1`: every neighbour is a candidate
and the audio check alone decides (which is what must reject the look-alikes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from audio_synth import tone_noise, write_audio
from cli_runner import clap
from clapcli.audio.decode import to_model_rate
from clapcli.cli.main import app
from clapcli.index.store import IndexStore
from clapcli.library.dedupe import find_duplicates

SR = 44_100


def snare(seed: int, seconds: float = 0.6) -> np.ndarray:
    """A synthesised snare hit: a decaying noise burst (from `seed`) over a decaying 190 Hz body."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.5 * rng.standard_normal(len(t)) * np.exp(-t / 0.08) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    return (0.8 * x / np.abs(x).max()).astype(np.float32)


def take(seed: int) -> np.ndarray:
    """One take of a five-note phrase: the same notes each time, played with the take's own timing, tuning,
    phases and breath noise."""
    rng = np.random.default_rng(seed)
    notes = []
    for f0 in (220.0, 262.0, 330.0, 294.0, 247.0):
        t = np.arange(int(0.35 * rng.uniform(0.85, 1.15) * SR)) / SR
        f = f0 * rng.uniform(0.98, 1.02)
        tone = sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        notes.append(tone * np.minimum(1.0, t / 0.02) * np.exp(-t / 0.3)
                     + 0.05 * rng.standard_normal(len(t)) * np.exp(-t / 0.1))
    x = np.concatenate(notes)
    return (0.7 * x / np.abs(x).max()).astype(np.float32)


def make_copies(lib: Path) -> dict[str, Path]:
    """One stereo 44.1 kHz 16-bit recording saved again in every way `clap dedupe` must see through."""
    base = tone_noise(3.0, SR, channels=2, seed=7)
    silence = np.zeros((SR // 2, 2), np.float32)
    resampled = np.stack([to_model_rate(base[:, c], SR, 22_050, quantize=False) for c in range(2)], axis=1)
    trim = int(0.3 * SR)
    files = {
        "original.wav": (base, SR, None, "PCM_16"),
        "copy.mp3": (base, SR, "MP3", None),
        "copy.ogg": (base, SR, "OGG", None),
        "copy.flac": (base, SR, "FLAC", None),
        "copy_22k.wav": (resampled, 22_050, None, "PCM_16"),
        "copy_24bit.wav": (base, SR, None, "PCM_24"),
        "copy_mono.wav": (base.mean(axis=1), SR, None, "PCM_16"),
        "copy_quiet.wav": (base * 10 ** (-12 / 20), SR, None, "PCM_16"),
        "copy_padded.wav": (np.concatenate([silence, base, silence]), SR, None, "PCM_16"),
        "copy_trimmed.wav": (base[trim:-trim], SR, None, "PCM_16"),
    }
    out = {}
    for name, (data, sr, fmt, subtype) in files.items():
        out[name] = Path(write_audio(lib / "copies" / name, data, sr, format=fmt, subtype=subtype))
    return out


def make_lookalikes(lib: Path) -> dict[str, Path]:
    sounds = {
        "snare_a.wav": snare(1), "snare_b.wav": snare(2), "snare_c.flac": snare(3),
        "take_1.wav": take(1), "take_2.wav": take(2),
        "other.wav": tone_noise(3.0, SR, channels=2, seed=8),
    }
    return {name: Path(write_audio(lib / "alike" / name, data, SR)) for name, data in sounds.items()}


def disk_state(root: Path) -> dict[str, tuple[int, int, str]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_copies_form_one_group_with_the_right_keeper_and_lookalikes_stay_apart(tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    (lib / "copies").mkdir(parents=True)
    (lib / "alike").mkdir()
    copies = make_copies(lib)
    alike = make_lookalikes(lib)
    index = tmp_path / "idx"
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    before = disk_state(lib)

    result = clap("dedupe", "--index", index, "--threshold", "-1", "-k", "20", "--json")
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 1, groups
    group = groups[0]
    keeper = group["keeper"]
    # lossless first, then 44.1 kHz over 22.05 kHz, then 24-bit over 16-bit
    assert keeper["path"] == str(copies["copy_24bit.wav"].resolve())
    assert (keeper["format"], keeper["sample_rate"], keeper["bit_depth"], keeper["channels"]) == ("WAV", SR, 24, 2)
    assert "bit depth" in group["why"]
    names = {os.path.basename(d["path"]) for d in group["duplicates"]}
    assert names == set(copies) - {"copy_24bit.wav"}
    assert all(d["similarity"] >= 0.85 for d in group["duplicates"])
    mp3 = next(d for d in group["duplicates"] if d["path"].endswith("copy.mp3"))
    assert mp3["bit_depth"] is None and mp3["format"] == "MP3"
    assert group["score"] == min(d["similarity"] for d in group["duplicates"])

    lines = clap("dedupe", "--index", index, "--threshold", "-1", "-k", "20", "--paths").stdout.splitlines()
    assert sorted(lines) == sorted(str(p.resolve()) for n, p in copies.items() if n != "copy_24bit.wav")
    raw = CliRunner().invoke(app, ["dedupe", "--index", str(index), "--threshold", "-1", "-k", "20", "-0"])
    assert raw.exit_code == 0
    assert sorted(raw.stdout_bytes.split(b"\0")[:-1]) == sorted(os.fsencode(line) for line in lines)
    assert raw.stdout_bytes.endswith(b"\0")
    assert disk_state(lib) == before  # nothing deleted, moved or touched

    # the look-alikes were candidates and compared: the audio check, not the embedding, kept them apart
    with IndexStore.open(index, readonly=True) as store:
        found = find_duplicates(store, threshold=-1.0, k=20)
    files = len(copies) + len(alike)
    assert found.candidates == files * (files - 1) // 2  # every pair was a candidate: the embedding kept none apart
    grouped = {d.facts.path for g in found for d in g.duplicates} | {g.keeper.path for g in found}
    assert not grouped & {str(p.resolve()) for p in alike.values()}


def test_files_missing_or_undecodable_on_disk_are_reported_not_grouped(tmp_path, tiny_model_dir):
    lib = tmp_path / "lib"
    base = tone_noise(2.0, SR, seed=3)
    lib.mkdir()
    write_audio(lib / "a.wav", base, SR)
    write_audio(lib / "b.flac", base, SR)
    write_audio(lib / "c.ogg", base, SR, format="OGG")
    write_audio(lib / "d.wav", base, SR, subtype="PCM_24")
    index = tmp_path / "idx"
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    (lib / "b.flac").unlink()
    (lib / "d.wav").write_bytes(b"not audio any more" * 100)  # replaced since it was indexed

    result = clap("dedupe", "--index", index, "--threshold", "-1", "--json")
    groups = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(groups) == 1
    members = {groups[0]["keeper"]["path"]} | {d["path"] for d in groups[0]["duplicates"]}
    assert members == {str((lib / "a.wav").resolve()), str((lib / "c.ogg").resolve())}
    assert "missing on disk" in result.stderr and "b.flac" in result.stderr
    assert "cannot decode" in result.stderr and "d.wav" in result.stderr


def test_paths_and_json_do_not_go_together(tmp_path):
    from cli_runner import fails

    fails("dedupe", "--index", tmp_path / "idx", "--json", "--paths", code=2, match="choose one of --json")


def test_keeper_order_is_lossless_then_rate_then_depth_then_length():
    from clapcli.library.dedupe import AudioFacts, why_keeper

    def facts(name, fmt, rate, depth, seconds):
        return AudioFacts(name, fmt, rate, depth, 2, seconds, lossless=depth is not None)

    mp3_48k = facts("a.mp3", "MP3", 48_000, None, 3.0)
    flac_22k = facts("b.flac", "FLAC", 22_050, 16, 3.0)
    wav_44k_16 = facts("c.wav", "WAV", 44_100, 16, 3.5)
    wav_44k_24 = facts("d.wav", "WAV", 44_100, 24, 3.0)
    wav_44k_24_long = facts("e.wav", "WAV", 44_100, 24, 3.4)
    ranked = sorted([mp3_48k, flac_22k, wav_44k_16, wav_44k_24, wav_44k_24_long], key=AudioFacts.rank)
    assert [f.path for f in ranked] == ["e.wav", "d.wav", "c.wav", "b.flac", "a.mp3"]
    assert sorted([mp3_48k, flac_22k], key=AudioFacts.rank)[0] is flac_22k  # lossless beats a higher rate
    why = why_keeper(ranked[0], ranked[1:])
    assert "lossless" in why and "MP3" in why and "sample rate" in why and "bit depth" in why and "longer" in why
    assert "first by path" in why_keeper(wav_44k_24, [facts("f.wav", "WAV", 44_100, 24, 3.0)])


@pytest.mark.skipif(shutil.which("espeak-ng") is None or shutil.which("sox") is None,
                    reason="needs espeak-ng and sox (Debian packages; .ci/run installs them)")
def test_two_spoken_takes_of_one_line_stay_apart_and_a_processed_copy_of_one_joins_it(tmp_path, tiny_model_dir):
    """Speech: the same sentence spoken twice (another rate and pitch) is two recordings; one take converted by sox
    (Ogg Vorbis at 16 kHz, 6 dB quieter, half a second of silence added) is the same recording."""
    lib = tmp_path / "lib"
    lib.mkdir()
    line = "the glass shattered on the kitchen floor"
    subprocess.run(["espeak-ng", "-w", str(lib / "take_1.wav"), "-s", "150", line], check=True)
    subprocess.run(["espeak-ng", "-w", str(lib / "take_2.wav"), "-s", "170", "-p", "65", line], check=True)
    subprocess.run(["sox", str(lib / "take_1.wav"), "-r", "16000", str(lib / "take_1_copy.ogg"),
                    "gain", "-6", "pad", "0.5", "0.5"], check=True)
    index = tmp_path / "idx"
    clap("index", lib, "--index", index, "--model", tiny_model_dir)
    groups = [json.loads(line) for line in
              clap("dedupe", "--index", index, "--threshold", "-1", "--json").stdout.splitlines()]
    assert len(groups) == 1, groups
    members = {os.path.basename(groups[0]["keeper"]["path"])} | {os.path.basename(d["path"])
                                                                  for d in groups[0]["duplicates"]}
    assert members == {"take_1.wav", "take_1_copy.ogg"}
    assert os.path.basename(groups[0]["keeper"]["path"]) == "take_1.wav"  # lossless before lossy
