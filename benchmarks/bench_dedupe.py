"""`clap dedupe`: precision and recall of the groups on generated copies and look-alikes; time on 100,000 files.

    python -m benchmarks.bench_dedupe                      # both parts (the timing part builds a 100k graph)
    python -m benchmarks.bench_dedupe --files 20000        # quicker timing part
    python -m benchmarks.bench_dedupe --skip-timing        # the quality part only (~1 min)
    python -m benchmarks.bench_dedupe --skip-quality --reuse   # time dedupe again on the saved 100k index

1. Quality. `--sources` recordings of three kinds, synthesised as in the tests: tone/sweep/noise mixes
   (`tests.audio_synth.tone_noise`, 3 s), snare hits (a noise burst over a 190 Hz body) and five-note phrase
   takes (both with 0.4 s of silence before and after).
   Each is saved as the original (44.1 kHz 16-bit stereo WAV) and `--copies` copies, each one or two of: MP3,
   OGG, FLAC, 22.05 kHz, 24-bit, mono, −12 dB, 0.5 s of silence added at both ends, 0.3 s trimmed off both
   ends. Each source also gets a look-alike: the same kind with another seed (another hit, another take,
   another mix). Vectors are planted, not embedded (the benchmark is about the grouping, not a model):
   copies lie at cosine ≈ 0.97 from their source's vector, look-alikes at ≈ 0.93, both above the default
   threshold 0.9, so every look-alike is a candidate and only the audio check can keep it apart. Files are
   written through `IndexStore.upsert_file` with their real paths; `find_duplicates` runs with its defaults.
   Reported: pairwise precision and recall (pairs of files put in one group vs pairs that are one
   recording), groups found exactly, the audio-match score of every copy and look-alike against its source,
   and the time of the audio checks.
2. Timing. `--files` random unit vectors on a random 32-dimensional subspace of 512 dims (a stand-in for real
   embeddings; see bench_search.py), 1 file-level vector per file, with `--planted` near-duplicate pairs
   (cosine ≈ 0.97) written through `IndexStore`. The paths do not exist, so the audio check is skipped (every
   candidate is "missing on disk"): what is timed is the candidate search, which dominates at this size —
   the graph build (as `clap index` does at the end of a run), then `find_duplicates` end to end on the
   saved graph, with its parts; and how many planted pairs the candidates hold (hnswlib recall).
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import time
from pathlib import Path

import numpy as np

from . import _common as C

SR = 44_100
DIM = 512
TRANSFORMS = ["mp3", "ogg", "flac", "22k", "24bit", "mono", "quiet", "padded", "trimmed"]


def snare(seed: int, seconds: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    x = 0.5 * rng.standard_normal(len(t)) * np.exp(-t / 0.08) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    return np.repeat((0.8 * x / np.abs(x).max()).astype(np.float32)[:, None], 2, axis=1)


def take(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    notes = []
    for f0 in (220.0, 262.0, 330.0, 294.0, 247.0):
        t = np.arange(int(0.35 * rng.uniform(0.85, 1.15) * SR)) / SR
        f = f0 * rng.uniform(0.98, 1.02)
        tone = sum(np.sin(2 * np.pi * h * f * t + rng.uniform(0, 2 * np.pi)) / h for h in range(1, 6))
        notes.append(tone * np.minimum(1.0, t / 0.02) * np.exp(-t / 0.3)
                     + 0.05 * rng.standard_normal(len(t)) * np.exp(-t / 0.1))
    x = np.concatenate(notes)
    return np.repeat((0.7 * x / np.abs(x).max()).astype(np.float32)[:, None], 2, axis=1)


def recording(kind: str, seed: int) -> np.ndarray:
    from tests.audio_synth import tone_noise

    if kind == "mix":
        return tone_noise(3.0, SR, channels=2, seed=seed)
    sound = snare(seed) if kind == "snare" else take(seed)
    room = np.zeros((int(0.4 * SR), 2), np.float32)  # a hit or take recorded with silence around it
    return np.concatenate([room, sound, room])


def save_copy(path: Path, data: np.ndarray, transforms: tuple[str, ...]) -> Path:
    from clapcli.audio.decode import to_model_rate
    from tests.audio_synth import write_audio

    sr, fmt, subtype, suffix = SR, None, "PCM_16", ".wav"
    for t in transforms:
        if t == "22k":
            data = np.stack([to_model_rate(data[:, c], SR, 22_050, quantize=False) for c in range(2)], axis=1)
            sr = 22_050
        elif t == "mono":
            data = data.mean(axis=1, keepdims=True)
        elif t == "quiet":
            data = data * 10 ** (-12 / 20)
        elif t == "padded":
            pad = np.zeros((sr // 2, data.shape[1]), np.float32)
            data = np.concatenate([pad, data, pad])
        elif t == "trimmed":
            cut = int(0.3 * sr)
            data = data[cut:-cut]
        elif t == "24bit":
            subtype = "PCM_24"
        elif t in ("mp3", "ogg", "flac"):
            fmt, subtype, suffix = t.upper(), None, "." + t
    target = path.with_suffix(suffix)
    write_audio(target, data, sr, format=fmt, subtype=subtype)
    return target


def perturbed(base: np.ndarray, cosine: float, rng) -> np.ndarray:
    """A unit vector at about `cosine` from unit `base`."""
    noise = rng.standard_normal(base.shape).astype(np.float32)
    noise -= (noise @ base) * base
    noise /= np.linalg.norm(noise)
    return (cosine * base + np.sqrt(1 - cosine ** 2) * noise).astype(np.float32)


def subspace_unit(n: int, seed: int, intrinsic_dim: int = 32) -> np.ndarray:
    basis = np.random.default_rng(12345).standard_normal((intrinsic_dim, DIM), dtype=np.float32)
    v = np.random.default_rng(seed).standard_normal((n, intrinsic_dim), dtype=np.float32) @ basis
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_store(index_dir: Path, entries: list[tuple[str, np.ndarray, float]]) -> float:
    from clapcli.index.store import IndexStore

    start = time.perf_counter()
    with IndexStore.open(index_dir, create=True) as store:
        with store.transaction():
            for n, (path, vector, duration) in enumerate(entries):
                store.upsert_file(path, size=1_000_000 + n, mtime_ns=1_700_000_000_000_000_000 + n,
                                  content_hash=None, duration=duration, sample_rate=SR, channels=2,
                                  segments=[(0.0, duration, "file", vector)])
    return time.perf_counter() - start


def quality(work: Path, sources: int, copies: int, seed: int) -> dict:
    from clapcli.index.store import IndexStore
    from clapcli.library.audio_match import fingerprint, match
    from clapcli.library.dedupe import find_duplicates

    if work.exists():
        shutil.rmtree(work)
    lib = work / "lib"
    lib.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    bases = subspace_unit(sources, seed + 1)
    entries, truth, kinds = [], {}, {}  # truth: path → source number (look-alikes: their own number)
    copy_transforms, lookalikes = {}, {}
    combos = [(t,) for t in TRANSFORMS] + [c for c in itertools.combinations(TRANSFORMS, 2)
                                          if not {"mp3", "ogg", "flac"}.issuperset(c) and "24bit" not in c]
    for s in range(sources):
        kind = ("mix", "snare", "take")[s % 3]
        data = recording(kind, 1000 + s)
        original = save_copy(lib / f"s{s:03d}_{kind}_original", data, ())
        entries.append((str(original.resolve()), bases[s], len(data) / SR))
        truth[entries[-1][0]], kinds[entries[-1][0]] = s, kind
        picks = rng.choice(len(combos), size=copies, replace=False)
        for c, pick in enumerate(picks):
            transforms = combos[pick]
            path = save_copy(lib / f"s{s:03d}_{kind}_copy{c}_{'+'.join(transforms)}", data, transforms)
            entries.append((str(path.resolve()), perturbed(bases[s], 0.97, rng), len(data) / SR))
            truth[entries[-1][0]], kinds[entries[-1][0]] = s, kind
            copy_transforms[entries[-1][0]] = (transforms, str(original.resolve()))
        other = save_copy(lib / f"s{s:03d}_{kind}_lookalike", recording(kind, 5000 + s), ())
        entries.append((str(other.resolve()), perturbed(bases[s], 0.93, rng), len(data) / SR))
        truth[entries[-1][0]], kinds[entries[-1][0]] = sources + s, kind
        lookalikes[entries[-1][0]] = str(original.resolve())
    write_store(work / "idx", entries)

    with IndexStore.open(work / "idx", readonly=True) as store:
        with C.Timer() as t:
            found = find_duplicates(store)
    predicted = {}
    for g, group in enumerate(found):
        for path in [group.keeper.path] + [d.facts.path for d in group.duplicates]:
            predicted[path] = g
    paths = list(truth)
    tp = fp = fn = 0
    for a, b in itertools.combinations(paths, 2):
        same = truth[a] == truth[b]
        grouped = a in predicted and predicted.get(a) == predicted.get(b)
        tp += same and grouped
        fp += grouped and not same
        fn += same and not grouped
    exact = 0  # sources whose copies make exactly one group, with nothing else in it
    for source in range(sources):
        members = {p for p in paths if truth[p] == source}
        groups = {predicted.get(p) for p in members}
        if len(groups) == 1 and None not in groups:
            exact += members == {p for p, g in predicted.items() if g in groups}

    scores_copy, scores_alike = {}, {}
    cache = {}

    def fp_of(path):
        if path not in cache:
            cache[path] = fingerprint(path)
        return cache[path]

    for path, (transforms, original) in copy_transforms.items():
        scores_copy.setdefault("+".join(transforms), []).append(match(fp_of(original), fp_of(path)).score)
    for path, original in lookalikes.items():
        scores_alike.setdefault(kinds[path], []).append(match(fp_of(original), fp_of(path)).score)
    return {
        "files": len(paths), "sources": sources, "copies_per_source": copies, "lookalikes": len(lookalikes),
        "candidates": found.candidates, "pairs_checked": found.checked, "find_duplicates_s": t.seconds,
        "pair_precision": tp / max(tp + fp, 1), "pair_recall": tp / max(tp + fn, 1), "true_pairs": tp + fn,
        "false_pairs": fp, "groups_exact": exact, "groups_found": len(found),
        "copy_score_min_by_transform": {k: min(v) for k, v in sorted(scores_copy.items())},
        "copy_score_min": min(min(v) for v in scores_copy.values()),
        "lookalike_score_max_by_kind": {k: max(v) for k, v in sorted(scores_alike.items())},
        "lookalike_score_max": max(max(v) for v in scores_alike.values()),
    }


def timing(work: Path, files: int, planted: int, seed: int, reuse: bool = False) -> dict:
    from clapcli.index.ann import AnnIndex
    from clapcli.index.store import IndexStore
    from clapcli.library import dedupe

    reuse = reuse and (work / "idx" / "vectors.hnsw").exists()
    if work.exists() and not reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vectors = subspace_unit(files, seed)
    twins = rng.choice(files, size=2 * planted, replace=False).reshape(planted, 2)
    for a, b in twins:
        vectors[b] = perturbed(vectors[a], 0.97, rng)
    entries = [(f"/bench/dedupe/set{n % 100:02d}/clip{n:06d}.wav", vectors[n], 8.0) for n in range(files)]
    out = {"files": files, "planted_pairs": planted, "reused": reuse}
    if not reuse:  # the same seed gives the same store: --reuse times only the dedupe
        out["insert_s"] = write_store(work / "idx", entries)
        with IndexStore.open(work / "idx") as store:
            with C.Timer() as build:
                AnnIndex.sync(store, persist=True)
        out["graph_build_s"] = build.seconds
    with C.Timer() as total:
        with IndexStore.open(work / "idx", readonly=True) as store:
            found = dedupe.find_duplicates(store)
    out.update(find_duplicates_s=total.seconds, candidates=found.candidates, missing=len(found.missing))
    # the parts, as find_duplicates runs them
    with IndexStore.open(work / "idx", readonly=True) as store:
        with C.Timer() as read:
            with store.snapshot():
                rows = store.segment_rows(store.segment_ids())
                segs = {r.segment_id: r.path for r in rows if r.kind == "file"}
                ids, vecs = store.vectors_by_id(segs)
        with C.Timer() as load:
            ann = AnnIndex.sync(store, persist=False)
        with C.Timer() as query:
            pairs = dedupe._candidate_pairs(ann, ids, dedupe.l2_normalize(vecs), dedupe.DEFAULT_THRESHOLD,
                                            dedupe.DEFAULT_K)
    position = {int(s): i for i, s in enumerate(ids.tolist())}
    by_path = {segs[int(s)]: position[int(s)] for s in ids.tolist()}
    wanted = {tuple(sorted((by_path[entries[a][0]], by_path[entries[b][0]]))) for a, b in twins}
    out.update(read_vectors_s=read.seconds, graph_load_s=load.seconds, neighbour_queries_s=query.seconds,
               planted_found=len(wanted & set(pairs)), other_candidates=len(set(pairs) - wanted))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=30, help="recordings in the quality set (default 30)")
    ap.add_argument("--copies", type=int, default=4, help="copies of each (default 4)")
    ap.add_argument("--files", type=int, default=100_000, help="files in the timing index (default 100000)")
    ap.add_argument("--planted", type=int, default=1_000, help="near-duplicate pairs planted (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="time dedupe on the timing index of an earlier run")
    args = ap.parse_args(argv)

    info = C.machine_info()
    C.print_machine(info)
    result = {"machine": info, "args": vars(args)}
    if not args.skip_quality:
        result["quality"] = quality(C.WORK / "dedupe-quality", args.sources, args.copies, args.seed)
        print("quality:", result["quality"])
    if not args.skip_timing:
        result["timing"] = timing(C.WORK / f"dedupe-timing-{args.files}", args.files, args.planted, args.seed,
                                  args.reuse)
        print("timing:", result["timing"])
    result["load_average_after"] = C.load_average()
    print("results:", C.write_result("dedupe", result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
