"""Search latency on a large index: hnswlib lookup alone, text query end to end, `clap search` cold start.

    python -m benchmarks.bench_search                         # 100,000 vectors (graph build ~4 min on 2 cores)
    python -m benchmarks.bench_search --vectors 20000         # quicker
    python -m benchmarks.bench_search --reuse                 # reuse the index built by an earlier run

1. Store: --vectors random unit vectors of dim 512 written through `IndexStore.upsert_file` in one
   transaction, --segments-per-file per file (default 4: one file-level vector + three 10 s windows, as
   `clap index` stores a 30 s file), so 100,000 vectors = 25,000 files. The model identity is the one
   of the benchmark model, so `clap search --model` accepts the index.
2. Graph: `AnnIndex.sync(store, persist=True)` builds the hnswlib graph (M 16, ef_construction 200,
   cosine) and writes it; its time is reported, then the time to open the store and load the graph as
   a fresh reader does (`AnnIndex.sync` on a current file).
3. hnswlib lookup alone: `AnnIndex.query(v, k=10)` (ef = max(4k, 64)) for --queries random unit vectors,
   one query per call, median and p95; recall@10 against exact brute force.
4. Text query end to end, model loaded once: `Clap.embed_text([q])` + `AnnIndex.query` +
   `IndexStore.segment_rows` for --text-queries different queries, median and p95 of each part.
5. Cold start: `clap search "QUERY" --index DIR --model MODEL --json` as a subprocess, wall clock
   (process start, imports, model load, graph load, query), --cli-runs times; skipped if the command
   does not exist yet. `clap --help` is timed as the floor of any `clap` process.

Isotropic random vectors in 512 dimensions are the worst case for HNSW (no structure at all): recall on
them is a lower bound for real embeddings. `--intrinsic-dim 32` draws the vectors from a random
32-dimensional subspace instead, a rough stand-in for real embeddings, which occupy few directions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from . import _common as C
from .make_model import make_model

DIM = 512
QUERIES = [
    "a dog barking", "rain on a tin roof", "glass shattering", "a siren passing by", "birds chirping",
    "a cat meowing", "an engine idling", "someone speaking quietly", "piano chords", "distant thunder",
    "footsteps on gravel", "a door slamming", "applause in a large hall", "wind through trees",
    "a baby crying", "church bells", "a kick drum loop", "ocean waves on a beach", "a telephone ringing",
    "keyboard typing", "a helicopter overhead", "crackling fire", "a crowd cheering in a stadium",
    "water dripping in a cave", "an electric guitar riff", "a horse galloping", "a train horn",
    "frying food in a pan", "a clock ticking", "a violin melody", "children playing outside",
    "a power drill", "heavy rain and thunder", "a cow mooing", "a jet taking off", "a bouncing ball",
    "a chainsaw cutting wood", "a rooster crowing", "a zipper being opened", "a camera shutter",
    "a whistle blowing", "an alarm clock beeping", "a snare drum roll", "a synthesizer pad",
    "a person coughing", "a car horn in traffic", "a frog croaking at night", "a vacuum cleaner",
    "a spoon stirring in a cup", "a choir singing",
]


def random_unit(n: int, dim: int, seed: int, intrinsic_dim: int = 0) -> np.ndarray:
    """n unit vectors: isotropic (intrinsic_dim 0), or on a random `intrinsic_dim`-dimensional subspace
    (Gaussian codes times one fixed random basis), a rough stand-in for real embeddings, which fill only
    a few dozen directions of the 512."""
    rng = np.random.default_rng(seed)
    if intrinsic_dim:
        basis = np.random.default_rng(12345).standard_normal((intrinsic_dim, dim), dtype=np.float32)  # shared
        v = rng.standard_normal((n, intrinsic_dim), dtype=np.float32) @ basis  # (n, dim)
    else:
        v = rng.standard_normal((n, dim), dtype=np.float32)  # (n, dim)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def fill_store(index_dir: Path, vectors: np.ndarray, per_file: int, identity: dict) -> dict:
    """Write `vectors` as files of `per_file` segments (1 file-level + windows) in one transaction."""
    from clapcli.index.store import IndexStore

    n_files = len(vectors) // per_file
    timings = {}
    with C.Timer() as t:
        with IndexStore.open(index_dir, create=True) as store:
            store.set_model_identity(identity)
            with store.transaction():
                for f in range(n_files):
                    vecs = vectors[f * per_file : (f + 1) * per_file]
                    if per_file == 1:
                        duration = 8.0
                        segments = [(0.0, duration, "file", vecs[0])]
                    else:
                        windows = per_file - 1
                        duration = 10.0 * windows
                        segments = [(0.0, duration, "file", vecs[0])] + [
                            (10.0 * w, 10.0 * (w + 1), "window", vecs[1 + w]) for w in range(windows)
                        ]
                    store.upsert_file(
                        f"/bench/library/set{f % 100:02d}/clip{f:06d}.wav", size=1_000_000 + f,
                        mtime_ns=1_700_000_000_000_000_000 + f, content_hash=None, duration=duration,
                        sample_rate=48_000, channels=1, segments=segments,
                    )
    timings["insert_s"] = t.seconds
    timings["files"] = n_files
    timings["vectors"] = n_files * per_file
    return timings


def build_graph(index_dir: Path) -> dict:
    from clapcli.index.ann import AnnIndex
    from clapcli.index.store import IndexStore

    with IndexStore.open(index_dir) as store:
        with C.Timer() as t:
            ann = AnnIndex.sync(store, persist=True)
    hnsw_bytes = sum(p.stat().st_size for p in index_dir.glob("vectors.hnsw*"))
    db_bytes = sum(p.stat().st_size for p in index_dir.glob("index.sqlite*"))
    return dict(build_s=t.seconds, action=ann.action, persisted=ann.persisted, count=ann.count,
                hnsw_bytes=hnsw_bytes, db_bytes=db_bytes)


def open_reader(index_dir: Path):
    """Open the store and the graph as `clap search` would; returns (store, ann, seconds)."""
    from clapcli.index.ann import AnnIndex
    from clapcli.index.store import IndexStore

    start = time.perf_counter()
    store = IndexStore.open(index_dir, readonly=True)
    ann = AnnIndex.sync(store)
    return store, ann, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=100_000, help="vectors in the index (default 100000)")
    ap.add_argument("--segments-per-file", type=int, default=4, help="vectors per file (default 4)")
    ap.add_argument("--intrinsic-dim", type=int, default=0,
                    help="draw the vectors (and queries) from a random subspace of this dimension instead of "
                    "isotropically (default 0 = isotropic, the worst case for HNSW)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=200, help="random queries for the lookup alone (default 200)")
    ap.add_argument("--text-queries", type=int, default=50, help="text queries end to end (default 50)")
    ap.add_argument("--cli-runs", type=int, default=3, help="cold `clap search` runs (default 3)")
    ap.add_argument("--reuse", action="store_true", help="reuse an index built by an earlier run with the same size")
    ap.add_argument("--skip-text", action="store_true", help="skip the model: lookup alone only")
    ap.add_argument("--skip-cli", action="store_true", help="skip the `clap search` subprocess")
    ap.add_argument("--ef", default="128,512", help="extra query beam widths to report recall/latency for "
                    "(comma-separated; the default ef of `AnnIndex.query` is always measured)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed part wait up to S seconds for other processes to go quiet (default 0)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR)
    args = ap.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    info = C.machine_info()
    C.print_machine(info)
    if args.model == C.MODEL_DIR:
        make_model(C.MODEL_DIR)
    index_dir = C.WORK / (f"search-index-{args.vectors}x{args.segments_per_file}"
                          + (f"-d{args.intrinsic_dim}" if args.intrinsic_dim else ""))
    stamp_file = index_dir / "bench_search.json"
    result: dict = dict(machine=info, index=str(index_dir), k=args.k, intrinsic_dim=args.intrinsic_dim)

    m = None
    if not args.skip_text or not (args.reuse and stamp_file.exists()):
        from clapcli import load_model

        with C.Timer() as t:
            m = load_model(str(args.model), device="cpu", precision="auto")
        result["model_load_s"] = t.seconds
        print(f"# model loaded in {t.seconds:.1f} s (precision {m.precision})", flush=True)

    vectors = random_unit(args.vectors, DIM, seed=1, intrinsic_dim=args.intrinsic_dim)
    if args.reuse and stamp_file.exists():
        build = json.loads(stamp_file.read_text())
        build["reused_from_earlier_run"] = True
        print(f"# reusing {index_dir} (built {build.get('date')})")
    else:
        shutil.rmtree(index_dir, ignore_errors=True)
        print(f"# writing {args.vectors} vectors through IndexStore ...", flush=True)
        C.wait_for_quiet(args.wait_quiet, label="the build")
        with C.CpuMeter() as meter:
            build = fill_store(index_dir, vectors, args.segments_per_file, m.identity_dict)
        print(f"#     {build['insert_s']:.1f} s; building the hnswlib graph ...", flush=True)
        with C.CpuMeter() as meter:
            build.update(build_graph(index_dir))
        build["other_share_during_build"] = meter.other_share
        build["date"] = info["date"]
        build["load_average_at_start"] = info["load_average_1_5_15"]
        print(f"#     {build['build_s']:.1f} s ({build['action']})", flush=True)
        stamp_file.write_text(json.dumps(build) + "\n")
    result["build"] = build

    C.wait_for_quiet(args.wait_quiet, label="the queries")
    store, ann, open_s = open_reader(index_dir)
    result["reader_open_s"] = open_s
    result["reader_action"] = ann.action
    print(f"# reader open (store + graph load): {open_s * 1000:.0f} ms ({ann.action})", flush=True)

    # hnswlib lookup alone, at the default beam width and at the extra ones
    stored = vectors[: build["vectors"]]
    queries = random_unit(args.queries, DIM, seed=2, intrinsic_dim=args.intrinsic_dim)
    exact = np.argsort(-(queries @ stored.T), axis=1)[:, : args.k] + 1  # segment ids start at 1, in insert order
    ann.query(queries[:1], args.k)  # warm-up
    result["lookup"] = []
    for ef in [None] + [int(x) for x in args.ef.split(",") if x.strip()]:
        lookup, hits = [], []
        with C.CpuMeter() as meter:
            for q in queries:
                t0 = time.perf_counter()
                ids, _ = ann.query(q[None], args.k, ef=ef)
                lookup.append(time.perf_counter() - t0)
                hits.append(ids[0])
        recall = float(np.mean([len(set(h) & set(e)) / args.k for h, e in zip(hits, exact)]))
        row = dict(C.summary_ms(lookup), ef=ef or max(4 * args.k, 64), default_ef=ef is None, recall_at_k=recall,
                   other_share=meter.other_share)
        result["lookup"].append(row)
        print(f"# lookup alone, ef {row['ef']}: median {row['median_ms']:.2f} ms, recall@{args.k} {recall:.3f}",
              flush=True)

    # known-item search: a query close to one stored vector (cosine ~0.7, as query-by-example of a similar
    # sound) must find that vector in the top k; exact search always does on random data.
    rng = np.random.default_rng(3)
    targets = rng.choice(len(stored), size=args.queries, replace=False)
    noise = random_unit(args.queries, DIM, seed=4)
    near = 0.7 * stored[targets] + np.sqrt(1 - 0.7**2) * noise  # (Q, D), ~unit norm
    found = 0
    for q, t in zip(near, targets):
        ids, _ = ann.query(q[None], args.k)
        found += int(t + 1 in set(ids[0].tolist()))
    result["known_item_hit_rate"] = found / len(targets)
    print(f"# known-item hit rate (default ef): {result['known_item_hit_rate']:.3f}", flush=True)

    # text query end to end
    if not args.skip_text and m is not None:
        m.embed_text(["warm-up"])
        parts = {"embed_text": [], "ann_query": [], "segment_rows": [], "total": []}
        texts = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(args.text_queries)]
        with C.CpuMeter() as meter:
            for text in texts:
                t0 = time.perf_counter()
                v = m.embed_text([text])
                t1 = time.perf_counter()
                ids, scores = ann.query(v, args.k)
                t2 = time.perf_counter()
                rows = store.segment_rows(ids[0])
                t3 = time.perf_counter()
                assert len(rows) == len(ids[0])
                parts["embed_text"].append(t1 - t0)
                parts["ann_query"].append(t2 - t1)
                parts["segment_rows"].append(t3 - t2)
                parts["total"].append(t3 - t0)
        result["text_end_to_end"] = {k: C.summary_ms(v) for k, v in parts.items()}
        result["text_other_share"] = meter.other_share
        print(f"# text end to end: median {result['text_end_to_end']['total']['median_ms']:.1f} ms", flush=True)
    store.close()

    # cold start of the CLI
    if not args.skip_cli:
        exe = C.clap_executable()
        floor = []
        for _ in range(max(1, args.cli_runs)):
            t0 = time.perf_counter()
            subprocess.run([exe, "--help"], capture_output=True, check=False)
            floor.append(time.perf_counter() - t0)
        result["clap_help_s"] = statistics.median(floor)
        if C.clap_has_command("search"):
            runs, outputs = [], None
            cmd = [exe, "search", "a dog barking", "--index", str(index_dir), "--model", str(args.model), "--json"]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
            for _ in range(max(1, args.cli_runs)):
                C.wait_for_quiet(args.wait_quiet, label="clap search")
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
                runs.append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    result["clap_search"] = dict(failed=f"exit {proc.returncode}", command=cmd,
                                                 stderr_tail=proc.stderr[-2000:])
                    break
                outputs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip().startswith("{")]
            else:
                result["clap_search"] = dict(command=cmd, runs_s=runs, median_s=statistics.median(runs),
                                             results=len(outputs or []),
                                             keys=sorted(outputs[0]) if outputs else [])
        else:
            result["clap_search"] = dict(skipped="`clap search` is not available in this checkout yet")
        print(f"# clap search: {result['clap_search']}", flush=True)

    report(result)
    out = C.write_result(f"bench_search-{args.vectors}" + (f"-d{args.intrinsic_dim}" if args.intrinsic_dim else ""),
                         result)
    print(f"\n# results written to {out}")
    return 0


def report(r: dict) -> None:
    b = r["build"]
    print()
    kind = f"on a random {r['intrinsic_dim']}-dimensional subspace" if r.get("intrinsic_dim") else "isotropic"
    print(f"vectors: {b['vectors']:,} random unit vectors of dim {DIM}, {kind}")
    print()
    rows = [
        ["IndexStore insert (one transaction)", f"{b['vectors']:,} vectors / {b['files']:,} files",
         f"{b['insert_s']:.1f} s"],
        ["AnnIndex.sync(persist=True): hnswlib build + write",
         f"M 16, ef_construction 200; other load {100 * b.get('other_share_during_build', float('nan')):.0f}%",
         f"{b['build_s']:.1f} s"],
        ["files on disk", f"hnsw {b['hnsw_bytes'] / 1e6:.0f} MB, sqlite {b['db_bytes'] / 1e6:.0f} MB", ""],
        ["reader open: store + graph load", r["reader_action"], f"{r['reader_open_s'] * 1000:.0f} ms"],
    ]
    if b.get("reused_from_earlier_run"):
        rows[0][2] += " (earlier run)"
        rows[1][2] += " (earlier run)"
    print(C.markdown_table(["step", "size", "time"], rows))
    print()
    rows = []
    for lk in r["lookup"]:
        name = f"hnswlib lookup alone (k={r['k']}, ef {lk['ef']}{', the default' if lk['default_ef'] else ''})"
        rows.append([name, lk["n"], f"{lk['median_ms']:.2f}", f"{lk['p95_ms']:.2f}",
                     f"recall@{r['k']} {lk['recall_at_k']:.3f}; other load {100 * lk['other_share']:.0f}%"])
    for name, s in (r.get("text_end_to_end") or {}).items():
        note = f"other load {100 * r['text_other_share']:.0f}%" if name == "total" else ""
        rows.append([f"text query: {name}", s["n"], f"{s['median_ms']:.2f}", f"{s['p95_ms']:.2f}", note])
    print(C.markdown_table(["latency", "n", "median ms", "p95 ms", "note"], rows))
    if "known_item_hit_rate" in r:
        print(f"\n- known-item hit rate at the default ef (query = 0.7 x a stored vector + noise, is it in the "
              f"top {r['k']}?): {r['known_item_hit_rate']:.3f}")
    if "clap_help_s" in r:
        print(f"\n- `clap --help` (process floor): {r['clap_help_s']:.2f} s")
    cs = r.get("clap_search")
    if cs:
        if "median_s" in cs:
            print(f"- `clap search` cold start: median {cs['median_s']:.2f} s over {len(cs['runs_s'])} runs "
                  f"({', '.join(f'{x:.2f}' for x in cs['runs_s'])}), {cs['results']} results, keys {cs['keys']}")
        else:
            print(f"- `clap search`: {cs.get('skipped') or cs}")


if __name__ == "__main__":
    sys.exit(main())
