"""GPU index throughput: end-to-end `clap index` against the forward-only ceiling of the same passes, on CUDA.

    python -m benchmarks.bench_gpu                          # 200 files of 5-30 s, batch 32, 4 decode workers
    python -m benchmarks.bench_gpu --files 1000 --batch-size 64 --workers 8 --precision bf16

Without CUDA it prints that it skipped and exits 0: nothing is measured on a CPU here (bench_index.py does
that). On a GPU, with the full-size fused model of make_model.py (random weights) and the library of
make_library.py:

(a) forward-only ceiling: `encode_audio` on features already on the GPU, batch B, timed with
    torch.cuda.synchronize; once for 10 s clips (global path) and once for fused inputs (files > 10 s),
    weighted by how many of each pass `clap index` runs on this library (every file once, plus every
    10 s window of files longer than 10 s). No decoding, resampling, mel front end or copies.
(b) `Clap.embed_files(segments=True, workers=W)`: the same passes with decoding in DataLoader workers,
    the mel front end on the GPU, no storage.
(c) the real `clap index LIB --device cuda --batch-size B --workers W --precision P --json` in a fresh
    process: (b) plus SQLite commits and the hnswlib file; its own summary's audio-seconds per second
    (model load included) and the wall time of the process.

Reported: audio-seconds per second of each and the share (b)/(a) and (c)/(a); issue #12 targets
(c) ≥ 80% of (a). Results go to benchmarks/_work/results/gpu-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _common as C

CLIP = 480_000  # samples of one 10 s clip at 48 kHz


def passes_of(durations: list[float]) -> tuple[int, int]:
    """(global 10 s passes, fused passes) `clap index` runs for files of these durations (fused model)."""
    short = fused = 0
    for seconds in durations:
        n = int(round(seconds * 48_000))
        if n > CLIP:
            fused += 1
            short += -(-(n - CLIP) // CLIP) + 1  # full-coverage windows, the last aligned to the end
        else:
            short += 1
    return short, fused


def forward_seconds(m, batch_size: int, longer: bool, repeats: int) -> float:
    """Median seconds of one `encode_audio` on a batch of features resident on the GPU."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    n = CLIP * 3 if longer else CLIP
    waves = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for _ in range(batch_size)]
    feats, is_longer = m.features.clip_features(waves, [None] * batch_size)
    times = []
    with torch.inference_mode(), m._autocast():
        for i in range(repeats + 2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            m.model.encode_audio(feats, is_longer)
            torch.cuda.synchronize()
            if i >= 2:  # two warm-up passes (kernel selection, allocator)
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=200, help="library size (default 200)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4, help="decode workers of (b) and (c)")
    ap.add_argument("--precision", default="auto", help="auto (bf16 on GPUs that run it), fp32 or bf16")
    ap.add_argument("--repeats", type=int, default=20, help="timed forward passes per kind in (a)")
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR, help="model directory (default: generated)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("bench_gpu: skipped: torch sees no CUDA device, so the GPU index throughput and the forward-only "
              "ceiling were not measured (run this on a machine with a GPU)")
        return 0

    from clapcli import load_model

    from .make_library import library_paths, make_library
    from .make_model import make_model

    info = C.machine_info()
    info["gpu"] = torch.cuda.get_device_name(0)
    C.print_machine(info)
    print(f"# GPU {info['gpu']}, batch {args.batch_size}, {args.workers} workers, precision {args.precision}")
    folder = C.LIBRARY_DIR if args.files == 200 else C.WORK / f"library-{args.files}"
    manifest = make_library(folder, files=args.files, quiet=True)
    paths = library_paths(folder, manifest)
    durations = [e["seconds"] for e in manifest["files"]]
    audio_seconds = sum(durations)
    model_dir = make_model(args.model, quiet=True)

    m = load_model(str(model_dir), device="cuda", precision=args.precision)
    short, fused = passes_of(durations)
    t_short = forward_seconds(m, args.batch_size, False, args.repeats)
    t_fused = forward_seconds(m, args.batch_size, True, args.repeats)
    ceiling_s = (short * t_short + fused * t_fused) / args.batch_size
    results = {"machine": info, "options": vars(args) | {"model": str(model_dir)}, "files": len(paths),
               "audio_seconds": audio_seconds, "passes": {"global": short, "fused": fused},
               "forward_s_per_batch": {"global": t_short, "fused": t_fused}}
    results["a_forward_ceiling"] = audio_seconds / ceiling_s

    list(m.embed_files(paths[:args.batch_size], batch_size=args.batch_size, workers=0))  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    embedded = list(m.embed_files(paths, batch_size=args.batch_size, segments=True, workers=args.workers))
    torch.cuda.synchronize()
    results["b_embed_files"] = audio_seconds / (time.perf_counter() - start)
    failed = [e.path for e in embedded if e.error]
    del m
    torch.cuda.empty_cache()

    index_dir = Path(tempfile.mkdtemp(prefix="bench-gpu-", dir=C.WORK))
    cmd = [C.clap_executable(), "index", str(folder), "--index", str(index_dir), "--model", str(model_dir),
           "--device", "cuda", "--batch-size", str(args.batch_size), "--workers", str(args.workers),
           "--precision", args.precision, "--json"]
    try:
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(index_dir, ignore_errors=True)
    summary = C.last_json_line(proc.stdout)
    if proc.returncode != 0 or summary is None:
        print(f"clap index failed (exit {proc.returncode}): {proc.stderr[-2000:]}", file=sys.stderr)
        return 1
    results["c_clap_index"] = summary["audio_seconds_per_second"]
    results["c_clap_index_wall"] = audio_seconds / wall

    ceiling = results["a_forward_ceiling"]
    rows = [
        ["(a) forward only (ceiling)", f"{ceiling:,.0f}", "100%"],
        ["(b) embed_files", f"{results['b_embed_files']:,.0f}", f"{results['b_embed_files'] / ceiling:.0%}"],
        ["(c) clap index (its summary)", f"{results['c_clap_index']:,.0f}",
         f"{results['c_clap_index'] / ceiling:.0%}"],
        ["(c) clap index (process wall)", f"{results['c_clap_index_wall']:,.0f}",
         f"{results['c_clap_index_wall'] / ceiling:.0%}"],
    ]
    print(C.markdown_table(["pipeline", "audio-s/s", "of ceiling"], rows))
    if failed:
        print(f"# {len(failed)} files failed in embed_files, e.g. {failed[0]}")
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = C.RESULTS_DIR / time.strftime("gpu-%Y%m%d-%H%M%S.json")
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"# results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
