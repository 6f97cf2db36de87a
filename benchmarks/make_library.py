"""Generate a reproducible benchmark library of mixed audio files.

    python -m benchmarks.make_library                    # 200 files of 5-30 s into benchmarks/_work/library
    python -m benchmarks.make_library --files 20 --out /tmp/lib

Each file's length is drawn uniformly from [--min-seconds, --max-seconds]; format (wav / flac / ogg /
mp3), sample rate (22.05 / 44.1 / 48 kHz) and channel count (mono / stereo) are drawn independently,
all from --seed, and the material is `tests.audio_synth.tone_noise` (tones, sweep, coloured noise
under an envelope). Files go into ten sub-folders, as a real library would be nested.

The folder holds a `manifest.json` with the parameters and every file's name, size and nominal length;
a second run with the same parameters finds it, checks the files are still there with their sizes, and
does nothing. Anything else (other parameters, missing or changed files) regenerates the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from ._common import LIBRARY_DIR

MANIFEST = "manifest.json"
GENERATOR_VERSION = 1  # bump when the generated content changes
FORMATS = {  # extension -> (soundfile format, subtype)
    "wav": ("WAV", "PCM_16"),
    "flac": ("FLAC", "PCM_16"),
    "ogg": ("OGG", "VORBIS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}
SAMPLE_RATES = (22_050, 44_100, 48_000)
CHANNELS = (1, 2)
SUBFOLDERS = 10


def plan(files: int, min_seconds: float, max_seconds: float, seed: int) -> list[dict]:
    """The list of files to write (name, seconds, format, rate, channels, seed), a pure function of the args."""
    rng = np.random.default_rng(seed)
    exts = list(FORMATS)
    out = []
    for i in range(files):
        seconds = float(rng.uniform(min_seconds, max_seconds))
        ext = exts[int(rng.integers(len(exts)))]
        sr = int(SAMPLE_RATES[int(rng.integers(len(SAMPLE_RATES)))])
        channels = int(CHANNELS[int(rng.integers(len(CHANNELS)))])
        name = f"set{i % SUBFOLDERS:02d}/clip{i:04d}_{seconds:05.2f}s_{sr}hz_{channels}ch.{ext}"
        out.append(dict(name=name, seconds=round(seconds, 4), ext=ext, sample_rate=sr, channels=channels,
                        seed=seed * 1_000_003 + i))
    return out


def _write_one(folder: str, item: dict) -> tuple[str, int]:
    from tests.audio_synth import tone_noise, write_audio

    path = Path(folder) / item["name"]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = tone_noise(item["seconds"], item["sample_rate"], item["channels"], seed=item["seed"])
    fmt, subtype = FORMATS[item["ext"]]
    write_audio(path, data, item["sample_rate"], format=fmt, subtype=subtype)
    return item["name"], path.stat().st_size


def _params(files: int, min_seconds: float, max_seconds: float, seed: int) -> dict:
    return dict(files=files, min_seconds=min_seconds, max_seconds=max_seconds, seed=seed, version=GENERATOR_VERSION)


def cached(folder: Path, params: dict) -> dict | None:
    """The manifest if `folder` already holds exactly this library, else None."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("params") != params:
        return None
    for entry in manifest.get("files", []):
        p = folder / entry["name"]
        if not p.is_file() or p.stat().st_size != entry["size"]:
            return None
    return manifest


def make_library(
    folder: Path = LIBRARY_DIR,
    files: int = 200,
    min_seconds: float = 5.0,
    max_seconds: float = 30.0,
    seed: int = 0,
    jobs: int = 2,
    quiet: bool = False,
) -> dict:
    """Make (or find) the library; returns its manifest (params, files with name/size/seconds/...)."""
    folder = Path(folder)
    params = _params(files, min_seconds, max_seconds, seed)
    manifest = cached(folder, params)
    if manifest is not None:
        if not quiet:
            print(f"library {folder}: {files} files already there (manifest matches), nothing to do")
        return manifest
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    items = plan(files, min_seconds, max_seconds, seed)
    start = time.perf_counter()
    sizes = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for name, size in pool.map(_write_one, [str(folder)] * len(items), items, chunksize=4):
            sizes[name] = size
    entries = [dict(item, size=sizes[item["name"]]) for item in items]
    manifest = dict(
        params=params,
        files=entries,
        total_seconds=round(sum(e["seconds"] for e in entries), 2),
        total_bytes=sum(e["size"] for e in entries),
    )
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if not quiet:
        print(
            f"library {folder}: wrote {files} files, {manifest['total_seconds'] / 60:.1f} min of audio, "
            f"{manifest['total_bytes'] / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s"
        )
    return manifest


def library_paths(folder: Path, manifest: dict) -> list[str]:
    return [str(Path(folder) / e["name"]) for e in manifest["files"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200, help="number of files (default 200)")
    ap.add_argument("--min-seconds", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=LIBRARY_DIR, help=f"folder (default {LIBRARY_DIR})")
    ap.add_argument("--jobs", type=int, default=2, help="writer processes (default 2)")
    args = ap.parse_args(argv)
    make_library(args.out, args.files, args.min_seconds, args.max_seconds, args.seed, args.jobs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
