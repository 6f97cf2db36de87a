"""Search latency as a user feels it: cold `clap search`, warm queries, `clap search --stdin`, `clap --help`,
each against the transformers equivalent on the same weights.

    python -m benchmarks.bench_cold                          # full-size model, 5 cold runs of each
    python -m benchmarks.bench_cold --model /tmp/tiny --vectors 2000 --stdin-queries 20

1. Start-up floors (subprocess walls, median of --repeat): `python -c pass`, `python -c "import torch"`,
   `clap --help`.
2. Cold text query, process start → results, interleaved runs:
   ours  `clap search "a dog barking" --index DIR --model MODEL --json` (an index of --vectors random vectors
         under the model's identity), with the saved query graph (no torch) and with CLAP_ENGINE=torch (the text
         half of the checkpoint, loaded through transformers: what a search without a saved graph does);
   transformers  `python -c` import torch + transformers, `ClapModel.from_pretrained(MODEL)`,
         `AutoTokenizer.from_pretrained`, tokenise, `get_text_features` (the issue's definition).
3. In-process, after the imports: model load (ours text-only, ours whole model, transformers
   `from_pretrained`) and warm text-query latency (one query per call, median of --text-queries):
   ours fp32, ours int8, transformers `get_text_features`.
4. `clap search --stdin --json`: time to the first answer (process start, load, first query), then the
   latency of each further distinct query, then of the same queries again (in-process cache hits).

Every timed part reports the share of the CPU other processes used meanwhile (`_common.CpuMeter`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import _common as C
from .bench_search import QUERIES, build_graph, fill_store, random_unit
from .make_model import make_model

HF_COLD = """
import sys, torch
from transformers import AutoTokenizer, ClapModel
model = ClapModel.from_pretrained(sys.argv[1]).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
with torch.inference_mode():
    out = model.get_text_features(**tokenizer(["a dog barking"], return_tensors="pt"))
print(tuple(getattr(out, "pooler_output", out).shape))
"""


def wall(cmd: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return time.perf_counter() - t0, proc


def stdin_latency(cmd: list[str], queries: list[str], env: dict | None) -> dict:
    """Feed `queries`, then the same again, one line at a time, timing each answer."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            bufsize=1, env=env)
    times: list[float] = []
    try:
        for q in [queries[0]] + queries[1:] + queries:
            start = time.perf_counter()
            proc.stdin.write(q + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"clap search --stdin stopped: {proc.stderr.read()[-1500:]}")
            times.append(time.perf_counter() - (t0 if not times else start))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    n = len(queries)
    return dict(first_answer_s=times[0], further=C.summary_ms(times[1:n]), repeated=C.summary_ms(times[n:]))


def warm_latency(embed, texts: list[str]) -> dict:
    embed([texts[0]])  # warm-up
    runs = []
    with C.CpuMeter() as meter:
        for text in texts:
            t0 = time.perf_counter()
            embed([text])
            runs.append(time.perf_counter() - t0)
    return dict(C.summary_ms(runs), other_share=meter.other_share)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=C.MODEL_DIR, help="model directory (default: the generated one)")
    ap.add_argument("--vectors", type=int, default=20_000, help="vectors in the search index (default 20000)")
    ap.add_argument("--repeat", type=int, default=5, help="cold runs of each command (default 5)")
    ap.add_argument("--text-queries", type=int, default=30, help="warm queries in-process (default 30)")
    ap.add_argument("--stdin-queries", type=int, default=30, help="distinct queries fed to --stdin (default 30)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each timed part wait up to S seconds for other processes to go quiet")
    ap.add_argument("--skip-hf", action="store_true", help="leave the transformers side out")
    args = ap.parse_args(argv)

    info = C.machine_info()
    C.print_machine(info)
    if args.model == C.MODEL_DIR:
        make_model(C.MODEL_DIR)
    exe = C.clap_executable()
    if exe is None:
        print("the `clap` entry point is not installed (pip install -e .)", file=sys.stderr)
        return 1
    result: dict = dict(machine=info, model=str(args.model), vectors=args.vectors, repeat=args.repeat)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")

    from clapcli import load_model

    text_model = load_model(str(args.model), device="cpu", precision="fp32", text_only=True)
    index_dir = C.WORK / f"cold-index-{args.vectors}-{text_model.fingerprint}"
    if not (index_dir / "bench_cold.json").exists():
        shutil.rmtree(index_dir, ignore_errors=True)
        print(f"# building an index of {args.vectors} vectors ...", flush=True)
        fill_store(index_dir, random_unit(args.vectors, text_model.dim, seed=1), 4, text_model.identity_dict)
        build_graph(index_dir)
        (index_dir / "bench_cold.json").write_text("{}\n")

    query_graph = None
    try:  # the torch-free text query (`clap index` saves it)
        from clapcli.models.onnx_text import load_text_query, save_text_query

        if save_text_query(text_model) is not None:
            query_graph = load_text_query(str(args.model))
    except ImportError:
        pass
    print("# start-up floors and cold queries (subprocesses, interleaved)", flush=True)
    py = sys.executable
    search = [exe, "search", "a dog barking", "--index", str(index_dir), "--model", str(args.model), "--json"]
    torch_env = dict(env, CLAP_ENGINE="torch")  # the model's text half loaded in torch
    commands = {
        "python -c pass": ([py, "-c", "pass"], env),
        "python -c 'import torch'": ([py, "-c", "import torch"], env),
        "clap --help": ([exe, "--help"], env),
        "clap search (cold, text)": (search, torch_env),
    }
    if query_graph is not None:
        commands["clap search (cold, text, saved query graph: no torch)"] = (search, env)
    if not args.skip_hf:
        commands["transformers text query (cold)"] = ([py, "-c", HF_COLD, str(args.model)], env)
    cold: dict[str, dict] = {name: dict(runs_s=[], other=[]) for name in commands}
    for rnd in range(args.repeat):
        for name, (cmd, cmd_env) in commands.items():
            C.wait_for_quiet(args.wait_quiet, label=name)
            with C.CpuMeter() as meter:
                seconds, proc = wall(cmd, cmd_env)
            if proc.returncode != 0:
                print(f"{name} failed: {proc.stderr[-1500:]}", file=sys.stderr)
                return 1
            cold[name]["runs_s"].append(seconds)
            cold[name]["other"].append(meter.other_share)
        print(f"#   round {rnd + 1}: " + ", ".join(f"{n} {c['runs_s'][-1]:.2f} s" for n, c in cold.items()), flush=True)
    for c in cold.values():
        c["median_s"] = statistics.median(c["runs_s"])
        c["other_share_max"] = max(c.pop("other"))
    result["cold"] = cold
    if "transformers text query (cold)" in cold:
        ours, theirs = cold["clap search (cold, text)"], cold["transformers text query (cold)"]
        result["cold_ratio_medians"] = ours["median_s"] / theirs["median_s"]
        result["cold_ratio_per_round"] = [a / b for a, b in zip(ours["runs_s"], theirs["runs_s"])]
        graph = cold.get("clap search (cold, text, saved query graph: no torch)")
        if graph is not None:
            result["cold_ratio_query_graph_medians"] = graph["median_s"] / theirs["median_s"]

    print("# in-process loads and warm queries", flush=True)
    import torch

    texts = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(args.text_queries)]
    loads, warm = {}, {}
    C.wait_for_quiet(args.wait_quiet, label="loads")
    with C.Timer() as t:
        lean = load_model(str(args.model), device="cpu", precision="fp32", text_only=True)
    loads["ours text-only fp32"] = t.seconds
    with C.Timer() as t:
        lean8 = load_model(str(args.model), device="cpu", precision="int8", text_only=True)
    loads["ours text-only int8 (load + quantise)"] = t.seconds
    with C.Timer() as t:
        whole = load_model(str(args.model), device="cpu", precision="fp32")
    loads["ours whole model fp32"] = t.seconds
    del whole
    warm["ours fp32"] = warm_latency(lean.embed_text, texts)
    warm["ours int8"] = warm_latency(lean8.embed_text, texts)
    if query_graph is not None:
        warm["ours saved query graph (onnxruntime fp32)"] = warm_latency(query_graph.embed_text, texts)
        result["query_graph_max_abs_diff"] = float(abs(query_graph.embed_text(texts) - lean.embed_text(texts)).max())
    a, b = lean.embed_text(texts), lean8.embed_text(texts)
    result["int8_text_min_cosine"] = float((a * b).sum(-1).min())
    if not args.skip_hf:
        from transformers import AutoTokenizer, ClapModel

        with C.Timer() as t:
            hf = ClapModel.from_pretrained(str(args.model)).eval()
            tok = AutoTokenizer.from_pretrained(str(args.model))
        loads["transformers ClapModel.from_pretrained + tokenizer"] = t.seconds

        def hf_embed(batch):
            with torch.inference_mode():
                return hf.get_text_features(**tok(batch, return_tensors="pt"))

        warm["transformers get_text_features"] = warm_latency(hf_embed, texts)
        del hf
    result["loads_s"], result["warm"] = loads, warm
    for name, s in loads.items():
        print(f"#   load {name}: {s:.2f} s")
    for name, s in warm.items():
        print(f"#   warm {name}: median {s['median_ms']:.1f} ms")

    print("# clap search --stdin", flush=True)
    C.wait_for_quiet(args.wait_quiet, label="--stdin")
    stdin_texts = [QUERIES[i % len(QUERIES)] + f" take {i}" for i in range(args.stdin_queries)]
    stdin_cmd = [exe, "search", "--stdin", "--json", "--index", str(index_dir), "--model", str(args.model)]
    runs = {"stdin": torch_env} if query_graph is None else {"stdin": torch_env, "stdin_query_graph": env}
    for key, run_env in runs.items():
        with C.CpuMeter() as meter:
            result[key] = stdin_latency(stdin_cmd, stdin_texts, run_env)
        result[key]["other_share"] = meter.other_share
        s = result[key]
        print(f"#   {key}: first answer {s['first_answer_s']:.2f} s; further queries median "
              f"{s['further']['median_ms']:.1f} ms; repeated (cache) median {s['repeated']['median_ms']:.1f} ms",
              flush=True)

    result["load_average_after"] = [round(x, 2) for x in C.load_average()]
    report(result)
    out = C.write_result("bench_cold", result)
    print(f"\n# results written to {out}")
    return 0


def report(r: dict) -> None:
    print()
    rows = [[name, f"{c['median_s']:.2f}", ", ".join(f"{x:.2f}" for x in c["runs_s"]),
             f"{100 * c['other_share_max']:.0f}%"] for name, c in r["cold"].items()]
    print(C.markdown_table(["process (cold)", "median s", "runs s", "max other load"], rows))
    if "cold_ratio_medians" in r:
        print(f"\n- cold clap search / cold transformers query: {r['cold_ratio_medians']:.2f}x on medians; per round "
              + ", ".join(f"{x:.2f}" for x in r["cold_ratio_per_round"]))
    if "cold_ratio_query_graph_medians" in r:
        print(f"- cold clap search with the saved query graph / cold transformers query: "
              f"{r['cold_ratio_query_graph_medians']:.2f}x on medians; query graph vs torch text embeddings: max abs "
              f"difference {r['query_graph_max_abs_diff']:.1e}")
    print()
    loads = [[k, f"{v:.2f}"] for k, v in r["loads_s"].items()]
    print(C.markdown_table(["in-process load (after imports)", "s"], loads))
    print()
    rows = [[k, v["n"], f"{v['median_ms']:.1f}", f"{v['p95_ms']:.1f}", f"{100 * v['other_share']:.0f}%"]
            for k, v in r["warm"].items()]
    print(C.markdown_table(["warm text query (1 text)", "n", "median ms", "p95 ms", "other load"], rows))
    print(f"\n- int8 vs fp32 text embeddings: min cosine {r['int8_text_min_cosine']:.5f}")
    for key in ("stdin", "stdin_query_graph"):
        if key not in r:
            continue
        s = r[key]
        what = "model in torch" if key == "stdin" else "saved query graph"
        print(f"- clap search --stdin ({what}): first answer {s['first_answer_s']:.2f} s; further distinct queries "
              f"median {s['further']['median_ms']:.1f} ms (p95 {s['further']['p95_ms']:.1f}); repeated queries median "
              f"{s['repeated']['median_ms']:.1f} ms; other load {100 * s['other_share']:.0f}%")


if __name__ == "__main__":
    sys.exit(main())
