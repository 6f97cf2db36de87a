"""A synthesised sound library for the index tests: nested folders, mixed formats, rates, channels, lengths."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np

from audio_synth import tone_noise, write_audio

# (relative path, seconds, sample rate, channels, soundfile subtype or None)
GOOD = [
    ("drums/kick_01.wav", 0.2, 44_100, 1, "PCM_16"),
    ("drums/kick_02.wav", 0.35, 48_000, 2, "PCM_24"),
    ("drums/snare_01.flac", 0.5, 44_100, 1, None),
    ("drums/snare_02.ogg", 0.8, 22_050, 2, None),
    ("drums/hat/closed_01.wav", 0.25, 96_000, 1, "FLOAT"),
    ("drums/hat/open_01.mp3", 1.2, 44_100, 2, None),
    ("drums/hat/open_02.flac", 1.5, 32_000, 1, None),
    ("drums/toms/tom_hi.wav", 0.9, 16_000, 1, "PCM_16"),
    ("drums/toms/tom_lo.ogg", 1.1, 48_000, 1, None),
    ("drums/loops/loop_90bpm.flac", 8.0, 44_100, 2, None),
    ("drums/loops/loop_120bpm.wav", 4.0, 48_000, 2, "PCM_16"),
    ("drums/loops/loop_long.mp3", 16.0, 44_100, 2, None),
    ("fx/whoosh_01.wav", 2.0, 48_000, 1, "PCM_16"),
    ("fx/whoosh_02.flac", 2.5, 44_100, 2, None),
    ("fx/impact_01.ogg", 3.0, 44_100, 1, None),
    ("fx/impact_02.mp3", 1.8, 48_000, 1, None),
    ("fx/riser.wav", 9.99, 48_000, 2, "PCM_24"),
    ("fx/drone.flac", 10.0, 48_000, 1, None),
    ("fx/drone_b.ogg", 10.005, 48_000, 1, None),
    ("fx/glass/shatter_01.wav", 1.4, 44_100, 1, "PCM_16"),
    ("fx/glass/shatter_02.flac", 2.2, 96_000, 2, None),
    ("fx/glass/clink.mp3", 0.6, 32_000, 1, None),
    ("ambience/rain_roof.flac", 30.0, 44_100, 2, None),
    ("ambience/forest.ogg", 22.0, 48_000, 2, None),
    ("ambience/city/street.wav", 14.0, 22_050, 1, "PCM_16"),
    ("ambience/city/traffic.mp3", 12.5, 44_100, 2, None),
    ("ambience/city/night/crickets.flac", 61.0, 48_000, 1, None),
    ("ambience/field_recording_long.wav", 90.0, 48_000, 1, "FLOAT"),
    ("music/pad_c.wav", 6.0, 44_100, 2, "PCM_16"),
    ("music/pad_f.flac", 7.5, 48_000, 2, None),
    ("music/bass/pluck_01.ogg", 0.7, 44_100, 1, None),
    ("music/bass/pluck_02.mp3", 0.9, 44_100, 1, None),
    ("music/bass/sub.wav", 3.3, 48_000, 6, "PCM_16"),
    ("music/keys/rhodes.flac", 5.0, 88_200, 2, None),
    ("music/keys/piano.ogg", 12.0, 44_100, 2, None),
    ("music/keys/organ.wav", 2.7, 8_000, 1, "PCM_U8"),
    ("voice/count.wav", 3.0, 16_000, 1, "PCM_16"),
    ("voice/breath.flac", 0.4, 48_000, 1, None),
    ("voice/shout.aiff", 1.0, 44_100, 2, "PCM_16"),
    ("voice/whisper.mp3", 2.0, 24_000, 1, None),
    ("voice/takes/take_01.wav", 11.0, 48_000, 2, "PCM_16"),
    ("voice/takes/take_02.flac", 4.4, 44_100, 1, None),
]

BROKEN = {
    "broken/empty.wav": "empty",
    "broken/not_audio.wav": "text",
    "broken/truncated.flac": "truncated",
}


def make_library(root: Path, good=GOOD) -> dict[str, float]:
    """Write the library under `root`; returns {absolute path: duration} of the good files."""
    durations = {}
    for i, (rel, seconds, sr, channels, subtype) in enumerate(good):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = tone_noise(seconds, sr, channels=channels, seed=i)
        fmt = {"ogg": "OGG", "mp3": "MP3", "aiff": "AIFF"}.get(path.suffix[1:])
        write_audio(path, data, sr, format=fmt, subtype=subtype)
        durations[str(path.resolve())] = seconds
    for rel, kind in BROKEN.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("this is not a sound file\n" * 20)
        else:
            full = root / "_full.flac"
            write_audio(full, tone_noise(6.0, 44_100, seed=99), 44_100)
            blob = full.read_bytes()
            path.write_bytes(blob[:2000])  # cut inside the first frame: nothing decodes (a shorter cut is "partial")
            full.unlink()
    return durations


def write_window_query(path: Path, samples: np.ndarray) -> None:
    """48 kHz float WAV: decodes to exactly these samples, so its embedding equals a stored window's."""
    write_audio(path, samples, 48_000, subtype="FLOAT")


def summary(result) -> dict:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")][-1]


def stored(index_dir: Path) -> dict[str, bytes]:
    """path → file-level embedding blob, read with plain SQL."""
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    rows = con.execute(
        "SELECT f.path, e.vector FROM files f JOIN segments s ON s.file_id = f.id "
        "JOIN embeddings e ON e.segment_id = s.id WHERE s.kind = 'file'"
    ).fetchall()
    con.close()
    return dict(rows)


def committed_files(index_dir: Path) -> int:
    """How many file rows the index has committed (0 while it does not exist yet)."""
    try:
        con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("SELECT count(*) FROM files").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0
