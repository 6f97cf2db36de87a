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
(b) ours, like for like: `Clap.embed_files(paths, batch_size=8, segments=False, workers=W)` for each
    of --configs, "precision[/engine]" (default fp32/torch, fp32/onnx, int8/torch, int8/onnx): precision
    fp32, auto (bf16 autocast only where the CPU has avx512_bf16/amx), bf16 or int8 (dynamic int8 Linear
    layers); engine torch, onnx (onnxruntime runs the HTSAT audio encoder) or auto; no engine = load_model's
    default. ours fp32/torch is the reference: every other configuration gets its speed-up over it, its
    min/median cosine to it over every file (int8 >= 0.995, fp32 on another engine >= 0.9999), top-1 ESC-50
    tag agreement and top-10 text-search overlap with it (see agreement_report).
(c) ours, the real `clap index LIBRARY --index TMP --model MODEL --json --batch-size 8 --workers W
    --precision P [--engine E]`: file embeddings AND 10 s window embeddings of every file longer than 10 s (a 25 s
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
INT8_MIN_COSINE = 0.995  # int8 (dynamic quantisation) against ours fp32/torch, every file
ENGINE_MIN_COSINE = 0.9999  # fp32 on another engine (onnxruntime) against ours fp32/torch, every file
REFERENCE = ("fp32", "torch")  # the configuration of ours every other one is compared with
PRECISIONS = ("fp32", "auto", "bf16", "int8")
ENGINES = ("auto", "torch", "onnx")
DEFAULT_CONFIGS = "fp32/torch,fp32/onnx,int8/torch,int8/onnx"
AGREEMENT_LABELSET = "esc50"  # built-in label set of the top-1 tag agreement
AGREEMENT_TOP_K = 10  # search overlap: |top-k ∩ top-k of fp32/torch| / k per query
# Text queries of the top-10 search overlap: everyday sounds, as someone searching a library would type them.
SEARCH_QUERIES = (
    "a dog barking",
    "rain on a window",
    "footsteps on gravel",
    "a car engine starting",
    "birds singing in the morning",
    "a baby crying",
    "church bells ringing",
    "thunder in the distance",
    "someone typing on a keyboard",
    "a door slamming",
    "waves crashing on a beach",
    "a siren passing by",
    "people talking in a crowded room",
    "a piano melody",
    "wind blowing through trees",
    "glass breaking",
    "a cat meowing",
    "a train passing",
    "water dripping from a tap",
    "an electric guitar solo",
)


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


def parse_configs(spec: str) -> list[tuple[str, str | None]]:
    """"fp32/torch,int8" -> [("fp32", "torch"), ("int8", None)]: (precision, engine or None = load_model's
    default). Raises ValueError on an unknown precision or engine, or a configuration given twice."""
    out: list[tuple[str, str | None]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        precision, _, engine = (x.strip().lower() for x in item.partition("/"))
        if precision not in PRECISIONS:
            raise ValueError(f"configuration {item!r}: precision must be one of {', '.join(PRECISIONS)}")
        if engine and engine not in ENGINES:
            raise ValueError(f"configuration {item!r}: engine must be one of {', '.join(ENGINES)}")
        config = (precision, engine or None)
        if config in out:
            raise ValueError(f"configuration {item!r} is given twice")
        out.append(config)
    if not out:
        raise ValueError("no configuration given")
    return out


def config_name(precision: str, engine: str | None) -> str:
    return f"{precision}/{engine}" if engine else precision


def load_ours(model_dir: Path, precision: str, engine: str | None = None):
    """(model, load seconds, note). `engine` is passed to load_model only when given; a load_model without the
    `engine` parameter (TypeError) loads engine torch without it (its default engine, which the row shows
    resolved) and returns model None for any other engine, with the note saying why; so does a failed load
    on an engine other than torch (e.g. onnx without onnxruntime)."""
    from clapcli.engine.load import load_model  # not the light `clapcli.load_model` wrapper, which may lag behind its kwargs

    kwargs = dict(device="cpu", precision=precision)
    if engine is not None:
        kwargs["engine"] = engine
    note = ""
    try:
        with C.Timer() as load:
            m = load_model(str(model_dir), **kwargs)
    except TypeError as err:
        if engine is None or "engine" not in str(err):
            raise
        if engine != "torch":
            return None, None, f"skipped: this clapcli's load_model has no engine parameter ({err})"
        with C.Timer() as load:
            m = load_model(str(model_dir), device="cpu", precision=precision)
        note = f"load_model has no engine parameter: loaded with its default engine ({resolved_engine(m)})"
    except Exception as err:  # e.g. engine onnx without onnxruntime installed: skip that configuration only
        if engine in (None, "torch"):
            raise
        return None, None, f"skipped: load_model(engine={engine!r}) failed: {type(err).__name__}: {err}"
    return m, load.seconds, note


def resolved_engine(m) -> str:
    """The engine the loaded model runs its audio encoder on (a Clap without the attribute is torch-only)."""
    return str(getattr(m, "engine", "torch"))


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
    library: Path, model_dir: Path, batch_size: int, workers: int, precision: str, threads: int | None = None,
    engine: str | None = None,
) -> dict:
    if not C.clap_has_command("index"):
        return dict(skipped="`clap index` is not available in this checkout yet (clap index --help fails)")
    index_dir = Path(tempfile.mkdtemp(prefix="bench-index-", dir=C.WORK))
    base = [C.clap_executable(), "index", str(library), "--index", str(index_dir), "--model", str(model_dir),
            "--json", "--batch-size", str(batch_size), "--workers", str(workers)]
    options = {"--precision": precision}
    if engine is not None:
        options["--engine"] = engine
    notes = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    try:
        while True:
            cmd = base + [x for flag, value in options.items() for x in (flag, value)]
            with C.CpuMeter() as meter:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
            missing = [flag for flag in options if flag in proc.stderr and "No such option" in proc.stderr]
            if proc.returncode == 0 or not missing:
                break
            for flag in missing:  # an older `clap index`: run it with its default instead, and say so
                notes.append(f"clap index has no {flag} option; ran with its default")
                del options[flag]
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
    ap.add_argument("--index-engine", choices=ENGINES,
                    help="--engine for clap index (default: the flag is not passed, the command's default)")
    ap.add_argument("--configs", default=None, metavar="LIST",
                    help="configurations of ours (b), comma-separated precision[/engine]; precision fp32, auto, "
                         "bf16 or int8, engine torch, onnx or auto (none: load_model's default); fp32/torch is "
                         f"the reference of the others (default {DEFAULT_CONFIGS})")
    ap.add_argument("--precisions", default=None, metavar="LIST",
                    help="deprecated: --configs with engine torch for each precision (fp32,int8 = "
                         "fp32/torch,int8/torch)")
    ap.add_argument("--check-long", type=int, default=16,
                    help="long files re-embedded by ours with transformers' crops for an exact check (default 16)")
    ap.add_argument("--library", type=Path, help="use this library folder (default: generated under _work)")
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR, help="model directory (default: generated)")
    args = ap.parse_args(argv)
    n_files = 20 if args.quick else args.files
    if args.precisions is not None and args.configs is not None:
        ap.error("give --configs or the deprecated --precisions, not both")
    if args.precisions is not None:
        print("# --precisions is deprecated: it means --configs with engine torch", file=sys.stderr)
        spec = ",".join(f"{p.strip()}/torch" for p in args.precisions.split(",") if p.strip())
    else:
        spec = args.configs if args.configs is not None else DEFAULT_CONFIGS
    try:
        configs = parse_configs(spec)
    except ValueError as err:
        ap.error(str(err))

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
    # ours: name -> dict(model, precision / engine asked for, resolved, load note); skipped ones apart
    ours: dict[str, dict] = {}
    skipped_configs: dict[str, str] = {}
    if not args.skip_ours:
        for precision, engine in configs:
            name = config_name(precision, engine)
            m, load_s, note = load_ours(args.model, precision, engine)
            if m is None:
                skipped_configs[name] = note
                print(f"# (b) {name}: {note}", flush=True)
                continue
            loads[f"b-{name}"] = load_s
            ours[name] = dict(model=m, precision=precision, engine=engine, resolved_precision=str(m.precision),
                              resolved_engine=resolved_engine(m), note=note)
    # The reference: the first configuration that ran fp32 on torch (fp32/torch, or fp32 whose default is torch).
    ref_name = next((n for n, o in ours.items()
                     if o["precision"] == REFERENCE[0] and o["resolved_engine"] == REFERENCE[1]), None)
    if ours and ref_name is None:
        print("# no ours fp32/torch among the configurations: no speed-up over it, fidelity or agreement "
              "against it", flush=True)

    runs: dict[str, list[dict]] = {"a": [], "c": [], **{f"b-{n}": [] for n in ours}}
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
        for name, o in ours.items():
            C.wait_for_quiet(args.wait_quiet, label=f"(b) {name}")
            r = run_ours(o["model"], paths, args.batch_size, args.workers)
            runs[f"b-{name}"].append(r)
            _progress(rnd, f"(b) ours {name}", r)
        if not args.skip_index and index_problem is None:
            C.wait_for_quiet(args.wait_quiet, label="(c)")
            r = run_clap_index(library, args.model, args.batch_size, args.workers, args.index_precision,
                               args.threads, args.index_engine)
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

    def add_row(name: str, precision: str, engine: str, passes: int, walls: list[float], best_run: dict, load_s,
                note="", config=None):
        best = min(walls)
        rows.append(dict(
            pipeline=name, precision=precision, engine=engine, config=config, forward_passes=passes, wall_s=best,
            wall_runs_s=walls, median_wall_s=float(np.median(walls)),
            other_share=best_run.get("other_share"), load_s=load_s, files_per_s=len(paths) / best,
            audio_s_per_s=audio_s / best, note=note,
        ))

    def best_of(key: str) -> dict:
        return min(runs[key], key=lambda r: r["wall_s"])

    if runs["a"]:
        b = best_of("a")
        t = b["times"]
        add_row("(a) transformers FE + get_audio_features", "fp32", "torch", len(paths),
                [r["wall_s"] for r in runs["a"]], b,
                loads["a"], f"decode+resample {t['decode_resample']:.1f} s, feature extractor "
                f"{t['feature_extractor']:.1f} s, forward {t['forward']:.1f} s (best round)")
    for name, o in ours.items():
        key = f"b-{name}"
        precision = o["precision"]
        if precision != o["resolved_precision"]:
            precision = f"{precision} (= {o['resolved_precision']} here)"
        engine = o["engine"] or "default"
        if engine != o["resolved_engine"]:
            engine = f"{engine} (= {o['resolved_engine']} here)"
        add_row("(b) ours embed_files, segments=False", precision, engine, len(paths),
                [r["wall_s"] for r in runs[key]], best_of(key), loads[key], o["note"], config=name)
    if runs["c"]:
        b = best_of("c")
        s = b["summary"]
        inner = _summary_number(s, "seconds", "elapsed", "elapsed_s", "wall_seconds")
        added = _summary_number(s, "added", "files_added", "indexed")
        reported_audio = _summary_number(s, "audio_seconds", "audio_s")
        fps = _summary_number(s, "files_per_second", "files_per_s")
        passes = len(paths) + n_windows
        index_engine = args.index_engine if args.index_engine and "--engine" in b["command"] else "default"
        add_row("(c) `clap index` (files + 10 s windows, SQLite, hnsw)", args.index_precision, index_engine, passes,
                [r["wall_s"] for r in runs["c"]], b, None,
                f"subprocess wall incl. process start, imports and model load; its summary: added={added}, "
                f"seconds={inner}, audio_seconds={reported_audio}, files_per_second={fps}; "
                f"index size {b['index_bytes'] / 1e6:.1f} MB" + ("; " + "; ".join(b["notes"]) if b["notes"] else ""))
        if inner:
            inners = [_summary_number(r["summary"], "seconds", "elapsed", "elapsed_s", "wall_seconds")
                      for r in runs["c"]]
            add_row("(c) `clap index`, the `seconds` it reports", args.index_precision, index_engine, passes,
                    inners, b, None, "time the command reports for itself (same runs)")

    base = rows[0]["audio_s_per_s"] if runs["a"] else None
    base_median = rows[0]["median_wall_s"] if runs["a"] else None
    ref_row = next((r for r in rows if ref_name is not None and r["config"] == ref_name), None)
    for row in rows:
        row["speedup_vs_a"] = row["audio_s_per_s"] / base if base else None
        row["median_speedup_vs_a"] = base_median / row["median_wall_s"] if base_median else None
        # over ours fp32/torch: for the (b) rows only, the like-for-like ones
        like = ref_row is not None and row["config"] is not None
        row["speedup_vs_fp32_torch"] = row["audio_s_per_s"] / ref_row["audio_s_per_s"] if like else None
        row["median_speedup_vs_fp32_torch"] = ref_row["median_wall_s"] / row["median_wall_s"] if like else None

    # Fidelity against transformers (ours fp32/torch) and of every other configuration against ours fp32/torch,
    # on the file embeddings of each one's best round.
    fidelity: dict = {}
    ref_emb = best_of(f"b-{ref_name}")["embeddings"] if ref_name is not None else None
    if first_hf is not None and ref_name is not None:
        fidelity = fidelity_report(ours[ref_name]["model"], first_hf, ref_emb, samples)
    comparisons: dict[str, dict] = {}
    agreement: dict = {}
    if ref_name is not None:
        others = {n: (o["model"], best_of(f"b-{n}")["embeddings"]) for n, o in ours.items() if n != ref_name}
        for name, (m, emb) in others.items():
            cos = cosine_rows(emb, ref_emb)
            comparisons[name] = dict(
                min_cosine=float(cos.min()), median_cosine=float(np.median(cos)),
                required_min_cosine=required_min_cosine(ours[name]["resolved_precision"]),
            )
        if others:
            print("\n# agreement with ours fp32/torch: embedding the ESC-50 prompts and the search queries ...",
                  flush=True)
            agreement = agreement_report(ours[ref_name]["model"], ref_emb, others)
            for name, values in comparisons.items():
                values.update(agreement[name])

    info_after = C.load_average()
    result = dict(
        machine=info, load_average_after=[round(x, 2) for x in info_after], files=len(paths),
        batch_size=args.batch_size, workers=args.workers, repeat=args.repeat, wait_quiet=args.wait_quiet,
        library=str(library), model=str(args.model), audio_seconds=audio_s, long_files=n_long,
        window_passes=n_windows, configs=[config_name(p, e) for p, e in configs], reference=ref_name,
        configurations={n: {k: v for k, v in o.items() if k != "model"} for n, o in ours.items()},
        skipped_configs=skipped_configs, index_engine=args.index_engine,
        rows=rows, fidelity=fidelity, vs_fp32_torch=comparisons, agreement_reference=agreement.get("reference"),
        search_queries=list(SEARCH_QUERIES), clap_index_problem=index_problem,
        clap_index_summaries=[r["summary"] for r in runs["c"]],
    )

    def times(x):
        return f"{x:.2f}x" if x else "-"

    print()
    print(C.markdown_table(
        ["pipeline", "precision", "engine", "forward passes", "best wall s", "files/s", "audio-s / s",
         "speed-up vs (a)", "speed-up, medians", "vs ours fp32/torch (best / medians)", "other load",
         "all rounds, s", "model load s"],
        [[r["pipeline"], r["precision"], r["engine"], r["forward_passes"], f"{r['wall_s']:.1f}",
          f"{r['files_per_s']:.2f}", f"{r['audio_s_per_s']:.1f}", times(r["speedup_vs_a"]),
          times(r["median_speedup_vs_a"]),
          f"{times(r['speedup_vs_fp32_torch'])} / {times(r['median_speedup_vs_fp32_torch'])}"
          if r["speedup_vs_fp32_torch"] else "-",
          f"{100 * r['other_share']:.0f}%" if r["other_share"] == r["other_share"] else "?",
          " / ".join(f"{w:.1f}" for w in r["wall_runs_s"]),
          f"{r['load_s']:.1f}" if r["load_s"] is not None else "-"] for r in rows],
    ))
    for r in rows:
        if r["note"]:
            print(f"- {r['pipeline']}{' ' + r['config'] if r['config'] else ''}: {r['note']}")
    for name, note in skipped_configs.items():
        print(f"- (b) {name}: {note}")
    print(f"- audio: {audio_s:.0f} s in {len(paths)} files, {n_long} longer than 10 s; "
          f"`clap index` adds {n_windows} window passes")
    print(f"- load average before {info['load_average_1_5_15']}, after {result['load_average_after']}")
    if comparisons:
        ref_info = agreement.get("reference") or {}
        k = ref_info.get("k", AGREEMENT_TOP_K)
        print()
        print(f"agreement with ours fp32/torch (file embeddings of the best round; {len(paths)} files, "
              f"{len(SEARCH_QUERIES)} text queries):")
        print(C.markdown_table(
            ["configuration", "min cosine", "median cosine", "required min", f"top-1 {AGREEMENT_LABELSET} tag agreement",
             f"top-{k} search overlap, mean", "min"],
            [[name, f"{c['min_cosine']:.6f}", f"{c['median_cosine']:.6f}",
              f"{c['required_min_cosine']}" if c["required_min_cosine"] else "- (reported)",
              f"{100 * c['top1_tag_agreement']:.1f}% ({c['top1_tag_disagreements']} differ)",
              f"{100 * c['search_top_k_overlap_mean']:.1f}%", f"{100 * c['search_top_k_overlap_min']:.0f}%"]
             for name, c in comparisons.items()],
        ))
        if ref_info:
            print(f"- fp32/torch itself: top-1 tags spread over {ref_info['distinct_top1_labels']} of the "
                  f"{AGREEMENT_LABELSET} labels, median cosine margin best - second label "
                  f"{ref_info['median_top1_cosine_margin']:.2g} (random weights: small margins flip easily)")
        if k < AGREEMENT_TOP_K:
            print(f"- only {len(paths)} files: top-{k} overlap is trivially 100%")
    if fidelity:
        print()
        print("fidelity (cosine, ours fp32/torch vs transformers, same decoded samples):")
        for k, v in fidelity.items():
            print(f"- {k}: {v}")
    failures = fidelity_failures(fidelity, comparisons)
    result["fidelity_failures"] = failures
    out = C.write_result("bench_index-quick" if args.quick else f"bench_index-{len(paths)}", result)
    print(f"\n# results written to {out}")
    if failures:
        for failure in failures:
            print(f"FIDELITY CHECK FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


def required_min_cosine(resolved_precision: str) -> float | None:
    """The cosine to ours fp32/torch every file of a configuration must reach: int8 INT8_MIN_COSINE, fp32 (on
    another engine) ENGINE_MIN_COSINE; bf16 is only reported."""
    return {"int8": INT8_MIN_COSINE, "fp32": ENGINE_MIN_COSINE}.get(resolved_precision)


def fidelity_failures(fidelity: dict, comparisons: dict | None = None) -> list[str]:
    """The fidelity checks that failed, as sentences: the deterministic comparisons (short files not forced
    onto the fusion path, long files given transformers' own crops) must reach MIN_COSINE, and every other
    configuration of ours its required_min_cosine against ours fp32/torch."""
    failures = []
    for key, what in (("short_min_cosine", "files <= 10 s"),
                      ("long_min_cosine_same_crops", "long files with transformers' crops")):
        value = fidelity.get(key)
        if value is not None and not value >= MIN_COSINE:  # `not >=` so that NaN fails too
            failures.append(f"{what}: min cosine {value:.6f} < {MIN_COSINE}")
    for name, c in (comparisons or {}).items():
        value, required = c.get("min_cosine"), c.get("required_min_cosine")
        if value is not None and required is not None and not value >= required:
            failures.append(f"{name} vs fp32/torch: min cosine {value:.6f} < {required}")
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


# ---------------------------------------------------------------------------------------------------------
# Agreement with ours fp32/torch: what a user of the tags and of search would notice


def esc50_label_embeddings(m) -> tuple[list[str], np.ndarray]:
    """The built-in ESC-50 labels and their (L, D) label embeddings from `m`'s own text tower, the way
    `clap tag` builds them (clapcli.tagging: resolve_labels -> default prompt template -> render ->
    embed_text -> prompt-ensembled label_embeddings), without the on-disk label cache (which keys on the
    precision but not on the engine, and may hold entries of an earlier checkout)."""
    from clapcli.tagging.labels import resolve_labels
    from clapcli.tagging.prompts import check_templates, render
    from clapcli.tagging.scoring import label_embeddings

    labelset = resolve_labels(AGREEMENT_LABELSET)
    templates = check_templates(None)
    text_emb = np.asarray(m.embed_text(render(templates, labelset.labels)), dtype=np.float32)
    return labelset.labels, label_embeddings(text_emb, len(templates), len(labelset))


def top1_labels(m, file_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per file, the index of the best ESC-50 label under `m`'s zero-shot scorer (the one `clap tag` uses),
    and the cosine margin between the best and the second best label."""
    from clapcli.tagging.scoring import ZeroShotScorer

    labels, label_emb = esc50_label_embeddings(m)
    scores = ZeroShotScorer(labels, label_emb, float(m.logit_scale))(file_emb)
    top = np.argmax(scores.probs, axis=1)
    cos = np.sort(scores.cosine, axis=1)
    return top, cos[:, -1] - cos[:, -2]


def search_top_k(m, file_emb: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of the files ranked best by cosine for each of SEARCH_QUERIES, with `m`'s text tower."""
    q = np.asarray(m.embed_text(list(SEARCH_QUERIES)), dtype=np.float32)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    files = file_emb / np.linalg.norm(file_emb, axis=1, keepdims=True)
    sims = q @ files.T  # (Q, N)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def agreement_report(ref_model, ref_emb: np.ndarray, others: dict) -> dict:
    """Per configuration in `others` ({name: (model, file embeddings)}): the share of files whose top-1 ESC-50
    tag equals ours fp32/torch's, and the mean and minimum top-10 overlap of SEARCH_QUERIES with it; plus,
    under "reference", how discriminative the reference itself is (with random weights the tags collapse
    onto few labels and the margins are tiny, so disagreement is easy and agreement says little)."""
    n = len(ref_emb)
    k = min(AGREEMENT_TOP_K, n)
    ref_top1, ref_margin = top1_labels(ref_model, ref_emb)
    ref_topk = search_top_k(ref_model, ref_emb, k)
    rep: dict = {"reference": dict(
        labelset=AGREEMENT_LABELSET, files=n, queries=len(SEARCH_QUERIES), k=k,
        distinct_top1_labels=int(len(set(ref_top1.tolist()))),
        median_top1_cosine_margin=float(np.median(ref_margin)),
    )}
    for name, (m, emb) in others.items():
        top1, _ = top1_labels(m, emb)
        topk = search_top_k(m, emb, k)
        overlap = np.array([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(topk, ref_topk)])
        rep[name] = dict(
            top1_tag_agreement=float(np.mean(top1 == ref_top1)),
            top1_tag_disagreements=int(np.sum(top1 != ref_top1)),
            search_top_k_overlap_mean=float(overlap.mean()),
            search_top_k_overlap_min=float(overlap.min()),
        )
    return rep


if __name__ == "__main__":
    sys.exit(main())
