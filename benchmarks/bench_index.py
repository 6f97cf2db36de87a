"""Index throughput: the transformers pipeline, `Clap.embed_files` and the real `clap index`, side by side.

    python -m benchmarks.bench_index --quick            # 20 files, smoke run (~2-3 min)
    python -m benchmarks.bench_index --repeat 3 --wait-quiet 300   # 200 files of 5-30 s, as in RESULTS.md
    python -m benchmarks.bench_index --files 400 --workers 2 --skip-hf

Same files (benchmarks/_work/library*, see make_library.py), same weights (the random full-size fused
model of make_model.py), batch 8, CPU, in one process run (the `clap index` part is a subprocess):

(a) transformers: per batch of 8 files, soundfile decode -> channel mean -> torchaudio resample to
    48 kHz -> int16 round trip (as the original CLAP and clapcli do, so both see identical samples) ->
    `ClapFeatureExtractor` (the hub's config) -> `ClapModel.get_audio_features`, fp32, inference_mode.
    Sequential in the main process: no decode workers (transformers has none to offer here).
    File-level embeddings only: one forward per file (fusion for files > 10 s).
(b) ours, like for like: `Clap.embed_files(paths, batch_size=8, segments=False, workers=W)` at each
    of --precisions: fp32, auto (bf16 autocast only where the CPU has avx512_bf16/amx) and int8 (dynamic
    int8 Linear layers; its min/median cosine to ours fp32 over every file is reported).
(c) ours, the real `clap index LIBRARY --index TMP --model MODEL --json --batch-size 8 --workers W
    --precision P`: file embeddings AND 10 s window embeddings of every file longer than 10 s (a 25 s
    file costs 1 fused pass + 3 window passes), SQLite commits and the hnswlib write, plus process start,
    imports and model load. More work than (a): its speed-up is not like for like (see the passes column).

Every pipeline gets one untimed warm-up batch (the first batch of files) before each timed pass; model
loading is reported apart. Fidelity: cosine between ours-fp32 and transformers per file. Files <= 10 s are
deterministic in both (when transformers' batch rule did not force them onto the fusion path) and must
agree to >= 0.9999; longer files use random crops in transformers and middle-of-thirds crops in ours, so
their cosine is only reported -- and, for the first --check-long of them, recomputed with ours given
transformers' own crops (replayed from the seeded numpy RNG), which must agree again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.hf_replay import replay_hf_fusion_crops

from . import _common as C
from .make_library import library_paths, make_library
from .make_model import make_model

CLIP = 480_000  # samples of one 10 s clip at 48 kHz
MIN_COSINE = 0.9999  # ours vs transformers on the same samples and crops (DESIGN.md §2, fidelity)
INT8_MIN_COSINE = 0.995  # int8 (dynamic quantisation) against ours fp32, every file


# ---------------------------------------------------------------------------------------------------------
# (a) the transformers pipeline


def hf_decode(path: str) -> tuple[np.ndarray, float]:
    """soundfile -> channel mean (float32) -> torchaudio resample to 48 kHz -> int16 round trip.
    Returns ((T,) float32 at 48 kHz, source duration s)."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    data, sr = sf.read(path, dtype="float32", always_2d=True)  # (T, C)
    mono = data[:, 0].copy() if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if sr != 48_000:
        mono = AF.resample(torch.from_numpy(mono), sr, 48_000).numpy()
    ints = (np.clip(mono, -1.0, 1.0) * np.float32(32767.0)).astype(np.int16)
    return (ints / 32767.0).astype(np.float32), len(data) / sr


def load_hf(model_dir: Path):
    from transformers import ClapFeatureExtractor, ClapModel

    with C.Timer() as load:
        model = ClapModel.from_pretrained(model_dir).eval()
        extractor = ClapFeatureExtractor.from_pretrained(model_dir)
    return (model, extractor), load.seconds


def run_hf(hf_model, paths: list[str], batch_size: int, keep_long: int) -> dict:
    import torch

    model, extractor = hf_model

    def batch(batch_paths: list[str], seed: int, times: dict | None):
        t0 = time.perf_counter()
        decoded = [hf_decode(p) for p in batch_paths]
        waves = [w for w, _ in decoded]
        t1 = time.perf_counter()
        np.random.seed(seed)  # reproducible fusion crops, replayed by replay_hf_fusion_crops
        inputs = extractor(waves, sampling_rate=48_000, return_tensors="pt")
        t2 = time.perf_counter()
        with torch.inference_mode():
            emb = model.get_audio_features(
                input_features=inputs["input_features"], is_longer=inputs["is_longer"]
            ).pooler_output  # (B, 512), L2-normalised
        t3 = time.perf_counter()
        if times is not None:
            times["decode_resample"] += t1 - t0
            times["feature_extractor"] += t2 - t1
            times["forward"] += t3 - t2
        return waves, [d for _, d in decoded], inputs["is_longer"][:, 0].numpy(), emb.float().numpy()

    batch(paths[:batch_size], seed=12345, times=None)  # warm-up: one full batch
    times = {"decode_resample": 0.0, "feature_extractor": 0.0, "forward": 0.0}
    embeddings, durations, samples, forced, long_checks = [], [], [], [], []
    with C.CpuMeter() as meter:
        for b in range(0, len(paths), batch_size):
            seed = 1000 + b
            waves, durs, is_longer, emb = batch(paths[b : b + batch_size], seed, times)
            crops = replay_hf_fusion_crops([len(w) for w in waves], seed)
            for i, w in enumerate(waves):
                samples.append(len(w))
                forced.append(bool(is_longer[i]) and crops[i] is None)  # the batch rule's random fusion pick
                if crops[i] is not None and len(long_checks) < keep_long:
                    long_checks.append((b + i, w, crops[i]))
            embeddings.append(emb)
            durations += durs
    return dict(
        wall_s=meter.seconds,
        other_share=meter.other_share,
        times=times,
        embeddings=np.concatenate(embeddings),
        durations=durations,
        samples=samples,
        forced_longer=forced,
        long_checks=long_checks,
    )


# ---------------------------------------------------------------------------------------------------------
# (b) ours: Clap.embed_files, file embeddings only


def load_ours(model_dir: Path, precision: str):
    from clapcli import load_model

    with C.Timer() as load:
        m = load_model(str(model_dir), device="cpu", precision=precision)
    return m, load.seconds


def run_ours(m, paths: list[str], batch_size: int, workers: int) -> dict:
    list(m.embed_files(paths[:batch_size], batch_size=batch_size, segments=False, workers=0))  # warm-up
    with C.CpuMeter() as meter:
        results = list(m.embed_files(paths, batch_size=batch_size, segments=False, workers=workers))
    errors = [r for r in results if r.error]
    if errors:
        raise RuntimeError(f"{len(errors)} files failed in embed_files, first: {errors[0].path}: {errors[0].error}")
    return dict(wall_s=meter.seconds, other_share=meter.other_share,
                embeddings=np.stack([r.embedding for r in results]))


# ---------------------------------------------------------------------------------------------------------
# (c) the real `clap index`


def run_clap_index(
    library: Path, model_dir: Path, batch_size: int, workers: int, precision: str, threads: int | None = None
) -> dict:
    if not C.clap_has_command("index"):
        return dict(skipped="`clap index` is not available in this checkout yet (clap index --help fails)")
    index_dir = Path(tempfile.mkdtemp(prefix="bench-index-", dir=C.WORK))
    base = [C.clap_executable(), "index", str(library), "--index", str(index_dir), "--model", str(model_dir),
            "--json", "--batch-size", str(batch_size), "--workers", str(workers)]
    cmd = base + ["--precision", precision]
    notes = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    try:
        with C.CpuMeter() as meter:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0 and "--precision" in proc.stderr and "No such option" in proc.stderr:
            notes.append("clap index has no --precision option; ran with its default precision")
            cmd = base
            with C.CpuMeter() as meter:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        summary = C.last_json_line(proc.stdout)
        if proc.returncode != 0 or summary is None:
            return dict(
                failed=f"exit {proc.returncode}", command=cmd,
                stderr_tail=proc.stderr[-2000:], stdout_tail=proc.stdout[-1000:],
            )
        index_bytes = sum(p.stat().st_size for p in index_dir.iterdir() if p.is_file())
        return dict(command=cmd, wall_s=meter.seconds, other_share=meter.other_share, summary=summary,
                    notes=notes, index_bytes=index_bytes)
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)


def _summary_number(summary: dict, *names: str) -> float | None:
    """The first of `names` present in the --json summary (nested one level under common keys too)."""
    for name in names:
        if isinstance(summary.get(name), (int, float)) and not isinstance(summary.get(name), bool):
            return float(summary[name])
    for value in summary.values():
        if isinstance(value, dict):
            found = _summary_number(value, *names)
            if found is not None:
                return found
    return None


# ---------------------------------------------------------------------------------------------------------
# Report


def window_count(n_samples: int) -> int:
    """Forward passes `clap index` spends on 10 s windows of one file (none for files <= 10 s)."""
    if n_samples <= CLIP:
        return 0
    last = n_samples - CLIP
    return len(range(0, last, CLIP)) + 1


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200, help="library size (default 200)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 files")
    ap.add_argument("--workers", type=int, default=1, help="decode workers for ours (default 1)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of (a), (b), (c), interleaved; the best round is reported (default 1)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed part wait up to S seconds for other processes to go quiet (default 0)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers pipeline (a)")
    ap.add_argument("--skip-ours", action="store_true", help="skip embed_files (b)")
    ap.add_argument("--skip-index", action="store_true", help="skip the `clap index` subprocess (c)")
    ap.add_argument("--index-precision", default="fp32", help="--precision for clap index (default fp32)")
    ap.add_argument("--precisions", default="fp32,auto,int8",
                    help="precisions of ours (b), comma-separated (default fp32,auto,int8)")
    ap.add_argument("--check-long", type=int, default=16,
                    help="long files re-embedded by ours with transformers' crops for an exact check (default 16)")
    ap.add_argument("--library", type=Path, help="use this library folder (default: generated under _work)")
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR, help="model directory (default: generated)")
    args = ap.parse_args(argv)
    n_files = 20 if args.quick else args.files

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    info = C.machine_info()
    C.print_machine(info)
    if args.library:
        library = args.library
        manifest = json.loads((library / "manifest.json").read_text())
    else:
        library = C.LIBRARY_DIR if n_files == 200 else C.WORK / f"library-{n_files}"
        manifest = make_library(library, files=n_files)
    paths = library_paths(library, manifest)
    if args.model == C.MODEL_DIR:
        make_model(C.MODEL_DIR)
    print(f"# {len(paths)} files, {manifest['total_seconds'] / 60:.1f} min of audio (nominal), "
          f"batch {args.batch_size}, workers {args.workers}, {args.repeat} round(s)", flush=True)

    loads: dict[str, float] = {}
    hf_model = None
    if not args.skip_hf:
        hf_model, loads["a"] = load_hf(args.model)
    ours_models = {}
    if not args.skip_ours:
        for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
            ours_models[precision], loads[f"b-{precision}"] = load_ours(args.model, precision)

    runs: dict[str, list[dict]] = {"a": [], "c": [], **{f"b-{p}": [] for p in ours_models}}
    first_hf = None
    index_problem = None
    for rnd in range(max(1, args.repeat)):
        if hf_model is not None:
            C.wait_for_quiet(args.wait_quiet, label="(a)")
            r = run_hf(hf_model, paths, args.batch_size, args.check_long)
            if first_hf is None:
                first_hf = r
            else:
                r = {k: v for k, v in r.items() if k in ("wall_s", "other_share", "times")}
            runs["a"].append(r)
            _progress(rnd, "(a) transformers", r)
        for precision, m in ours_models.items():
            C.wait_for_quiet(args.wait_quiet, label=f"(b) {precision}")
            r = run_ours(m, paths, args.batch_size, args.workers)
            runs[f"b-{precision}"].append(r)
            _progress(rnd, f"(b) ours {precision}", r)
        if not args.skip_index and index_problem is None:
            C.wait_for_quiet(args.wait_quiet, label="(c)")
            r = run_clap_index(library, args.model, args.batch_size, args.workers, args.index_precision,
                               args.threads)
            if "skipped" in r or "failed" in r:
                index_problem = r
                print(f"#   (c) clap index: {r.get('skipped') or r.get('failed')}")
                if "stderr_tail" in r:
                    print(r["stderr_tail"])
            else:
                runs["c"].append(r)
                _progress(rnd, "(c) clap index", r)

    # The audio everyone processes: source durations (from the decode) and 48 kHz sample counts.
    if first_hf is not None:
        durations, samples = first_hf["durations"], first_hf["samples"]
    else:
        import soundfile as sf

        durations = [sf.info(p).duration for p in paths]
        samples = [int(round(d * 48_000)) for d in durations]
    audio_s = float(sum(durations))
    n_windows = sum(window_count(n) for n in samples)
    n_long = sum(n > CLIP for n in samples)

    rows = []

    def add_row(name: str, precision: str, passes: int, walls: list[float], best_run: dict, load_s, note=""):
        best = min(walls)
        rows.append(dict(
            pipeline=name, precision=precision, forward_passes=passes, wall_s=best, wall_runs_s=walls,
            median_wall_s=float(np.median(walls)),
            other_share=best_run.get("other_share"), load_s=load_s, files_per_s=len(paths) / best,
            audio_s_per_s=audio_s / best, note=note,
        ))

    def best_of(key: str) -> dict:
        return min(runs[key], key=lambda r: r["wall_s"])

    if runs["a"]:
        b = best_of("a")
        t = b["times"]
        add_row("(a) transformers FE + get_audio_features", "fp32", len(paths), [r["wall_s"] for r in runs["a"]], b,
                loads["a"], f"decode+resample {t['decode_resample']:.1f} s, feature extractor "
                f"{t['feature_extractor']:.1f} s, forward {t['forward']:.1f} s (best round)")
    for precision, m in ours_models.items():
        key = f"b-{precision}"
        label = f"auto (= {m.precision} here)" if precision == "auto" else precision
        add_row("(b) ours embed_files, segments=False", label, len(paths), [r["wall_s"] for r in runs[key]],
                best_of(key), loads[key])
    if runs["c"]:
        b = best_of("c")
        s = b["summary"]
        inner = _summary_number(s, "seconds", "elapsed", "elapsed_s", "wall_seconds")
        added = _summary_number(s, "added", "files_added", "indexed")
        reported_audio = _summary_number(s, "audio_seconds", "audio_s")
        fps = _summary_number(s, "files_per_second", "files_per_s")
        passes = len(paths) + n_windows
        add_row("(c) `clap index` (files + 10 s windows, SQLite, hnsw)", args.index_precision, passes,
                [r["wall_s"] for r in runs["c"]], b, None,
                f"subprocess wall incl. process start, imports and model load; its summary: added={added}, "
                f"seconds={inner}, audio_seconds={reported_audio}, files_per_second={fps}; "
                f"index size {b['index_bytes'] / 1e6:.1f} MB" + ("; " + "; ".join(b["notes"]) if b["notes"] else ""))
        if inner:
            inners = [_summary_number(r["summary"], "seconds", "elapsed", "elapsed_s", "wall_seconds")
                      for r in runs["c"]]
            add_row("(c) `clap index`, the `seconds` it reports", args.index_precision, passes, inners, b, None,
                    "time the command reports for itself (same runs)")

    base = rows[0]["audio_s_per_s"] if runs["a"] else None
    base_median = rows[0]["median_wall_s"] if runs["a"] else None
    for row in rows:
        row["speedup_vs_a"] = row["audio_s_per_s"] / base if base else None
        row["median_speedup_vs_a"] = base_median / row["median_wall_s"] if base_median else None

    fidelity: dict = {}
    if first_hf is not None and "fp32" in ours_models:
        fidelity = fidelity_report(ours_models["fp32"], first_hf, runs["b-fp32"][0]["embeddings"], samples)
    for other in ("auto", "int8"):
        if "fp32" in ours_models and other in ours_models:
            cos = cosine_rows(runs[f"b-{other}"][0]["embeddings"], runs["b-fp32"][0]["embeddings"])
            fidelity[f"{other}_vs_fp32_min_cosine"] = float(cos.min())
            fidelity[f"{other}_vs_fp32_median_cosine"] = float(np.median(cos))

    info_after = C.load_average()
    result = dict(
        machine=info, load_average_after=[round(x, 2) for x in info_after], files=len(paths),
        batch_size=args.batch_size, workers=args.workers, repeat=args.repeat, wait_quiet=args.wait_quiet,
        library=str(library),
        model=str(args.model), audio_seconds=audio_s, long_files=n_long, window_passes=n_windows,
        rows=rows, fidelity=fidelity, clap_index_problem=index_problem,
        clap_index_summaries=[r["summary"] for r in runs["c"]],
    )

    print()
    print(C.markdown_table(
        ["pipeline", "precision", "forward passes", "best wall s", "files/s", "audio-s / s", "speed-up vs (a)",
         "speed-up, medians", "other load", "all rounds, s", "model load s"],
        [[r["pipeline"], r["precision"], r["forward_passes"], f"{r['wall_s']:.1f}", f"{r['files_per_s']:.2f}",
          f"{r['audio_s_per_s']:.1f}", f"{r['speedup_vs_a']:.2f}x" if r["speedup_vs_a"] else "-",
          f"{r['median_speedup_vs_a']:.2f}x" if r["median_speedup_vs_a"] else "-",
          f"{100 * r['other_share']:.0f}%" if r["other_share"] == r["other_share"] else "?",
          " / ".join(f"{w:.1f}" for w in r["wall_runs_s"]),
          f"{r['load_s']:.1f}" if r["load_s"] is not None else "-"] for r in rows],
    ))
    for r in rows:
        if r["note"]:
            print(f"- {r['pipeline']}: {r['note']}")
    print(f"- audio: {audio_s:.0f} s in {len(paths)} files, {n_long} longer than 10 s; "
          f"`clap index` adds {n_windows} window passes")
    print(f"- load average before {info['load_average_1_5_15']}, after {result['load_average_after']}")
    if fidelity:
        print()
        print("fidelity (cosine, ours fp32 vs transformers, same decoded samples):")
        for k, v in fidelity.items():
            print(f"- {k}: {v}")
    failures = fidelity_failures(fidelity)
    result["fidelity_failures"] = failures
    out = C.write_result("bench_index-quick" if args.quick else f"bench_index-{len(paths)}", result)
    print(f"\n# results written to {out}")
    if failures:
        for failure in failures:
            print(f"FIDELITY CHECK FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def fidelity_failures(fidelity: dict) -> list[str]:
    """The fidelity checks that failed, as sentences: the deterministic comparisons (short files not forced
    onto the fusion path, long files given transformers' own crops) must reach MIN_COSINE."""
    failures = []
    for key, what in (("short_min_cosine", "files <= 10 s"),
                      ("long_min_cosine_same_crops", "long files with transformers' crops")):
        value = fidelity.get(key)
        if value is not None and not value >= MIN_COSINE:  # `not >=` so that NaN fails too
            failures.append(f"{what}: min cosine {value:.6f} < {MIN_COSINE}")
    value = fidelity.get("int8_vs_fp32_min_cosine")
    if value is not None and not value >= INT8_MIN_COSINE:
        failures.append(f"int8 vs fp32: min cosine {value:.6f} < {INT8_MIN_COSINE}")
    return failures


def _progress(rnd: int, name: str, r: dict) -> None:
    print(f"#   round {rnd + 1}: {name}: {r['wall_s']:.1f} s (other processes {100 * r['other_share']:.0f}% of the CPU)",
          flush=True)


def fidelity_report(m, hf: dict, ours_fp32: np.ndarray, samples: list[int]) -> dict:
    cos = cosine_rows(ours_fp32, hf["embeddings"])
    short = np.array([n <= CLIP for n in samples])
    forced = np.array(hf["forced_longer"])
    strict = short & ~forced
    rep: dict = {
        "short_files_checked": int(strict.sum()),
        "short_min_cosine": float(cos[strict].min()) if strict.any() else None,
        "short_forced_onto_fusion_by_hf_batch_rule": int((short & forced).sum()),
        "long_files": int((~short).sum()),
        "long_min_cosine_different_crops": float(cos[~short].min()) if (~short).any() else None,
        "long_median_cosine_different_crops": float(np.median(cos[~short])) if (~short).any() else None,
    }
    if short.any() and forced.any():
        rep["short_forced_min_cosine"] = float(cos[short & forced].min())
    checks = hf["long_checks"]
    if checks:
        embs = m.embed_waveforms([w for _, w, _ in checks], segments=False, batch_size=8,
                                 crop_starts=[c for _, _, c in checks])
        matched = cosine_rows(np.stack([e.embedding for e in embs]), hf["embeddings"][[i for i, _, _ in checks]])
        rep["long_files_rechecked_with_hf_crops"] = len(checks)
        rep["long_min_cosine_same_crops"] = float(matched.min())
    # How discriminative the check is with random weights: cosine between different files.
    e = hf["embeddings"] / np.linalg.norm(hf["embeddings"], axis=1, keepdims=True)
    gram = e @ e.T
    off = gram[~np.eye(len(e), dtype=bool)]
    rep["between_different_files_median_cosine"] = float(np.median(off)) if off.size else None
    rep["between_different_files_max_cosine"] = float(off.max()) if off.size else None
    return rep


if __name__ == "__main__":
    sys.exit(main())
