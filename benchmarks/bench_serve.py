"""`clap serve`'s API: a warm text query at 10,000 files, the map at 100,000, start-up to the first answer, peaks.

    python -m benchmarks.bench_serve                       # the RESULTS.md run
    python -m benchmarks.bench_serve --files 2000 --map-files 20000 --long-minutes 10   # quicker

1. Stores of random unit vectors (one file-level vector per file) written through `IndexStore` (as
   bench_search does), under the identity of the tests' tiny fused model, whose text query graph is saved
   (`onnx_text.save_text_query`), so the server answers text without torch, as after a real `clap index`.
2. Warm text query: `GET /api/search?q=…&k=50` through Starlette's TestClient (the app in process, no socket),
   --queries different texts after one warm-up query (model, graph and label embeddings loaded): median and
   p95 of the whole request, hits with their windows and 5 tags each.
3. Map: `GET /api/map` at --map-files files, first answer (vectors read, PCA, JSON) and cached answer.
4. Start-up: `clap serve --port 0` as a subprocess until `/api/search` answers over real HTTP, --startup-runs
   (run first, while this process is still idle).
5. Peaks: a --long-minutes 16 kHz mono WAV, `GET /api/peaks/N` cold (decoded in blocks) and then 50 cached
   answers (a page of 50 long results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np

from . import _common as C
from tests.entry_point import clap_executable

from .bench_search import QUERIES, fill_store, random_unit

WORK = C.WORK / "serve"


def tiny_model() -> Path:
    from tests.tiny_models import save_hf_clap

    directory = WORK / "tiny-model"
    if not (directory / "config.json").is_file():
        directory.mkdir(parents=True, exist_ok=True)
        save_hf_clap(directory, fused=True, seed=1)
    return directory


def prepared_model(directory: Path) -> dict:
    """The tiny model's identity, with its torch-free query graph saved in this CLAP_HOME."""
    from clapcli.engine.load import load_model
    from clapcli.models.onnx_text import save_text_query

    clap = load_model(str(directory), device="cpu", precision="fp32")
    save_text_query(clap)
    return clap.identity_dict


def store(files: int, identity: dict, graph: bool) -> Path:
    from .bench_search import build_graph

    index = WORK / f"index-{files}"
    if not (index / "index.sqlite").is_file():
        fill_store(index, random_unit(files, int(identity["dim"]), seed=files), 1, identity)
        if graph:
            build_graph(index)
    return index


def warm_queries(index: Path, n: int) -> dict:
    from starlette.testclient import TestClient

    from clapcli.serve.app import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(index)), base_url="http://127.0.0.1:8765") as api:
        with C.Timer() as first:
            assert api.get("/api/search", params={"q": "warm up", "k": 50}).status_code == 200
        times = []
        for q in QUERIES[:n]:
            with C.Timer() as t:
                r = api.get("/api/search", params={"q": q, "k": 50})
            assert r.status_code == 200 and len(r.json()["hits"]) == 50, r.text
            times.append(t.seconds)
        engine = type(api.app.served.reader.text_model()).__name__
    return {"first_query_s": first.seconds, "engine": engine, **C.summary_ms(times)}


def map_times(index: Path) -> dict:
    from starlette.testclient import TestClient

    from clapcli.serve.app import ServeConfig, create_app

    with TestClient(create_app(ServeConfig(index)), base_url="http://127.0.0.1:8765") as api:
        with C.Timer() as cold:
            r = api.get("/api/map")
        body = r.json()
        with C.Timer() as warm:
            api.get("/api/map")
        with C.Timer() as tag:
            api.get("/api/map", params={"color": "tag"})
    return {"points": len(body["ids"]), "method": body["method"], "cold_s": cold.seconds, "cached_s": warm.seconds,
            "tag_colours_s": tag.seconds, "json_mb": len(r.content) / 1e6}


def startup(index: Path, runs: int) -> dict:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.Popen([clap_executable(), "serve", "--index", str(index), "--port", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
            with urllib.request.urlopen(url + "api/search?q=rain&k=10", timeout=120) as r:
                assert len(json.loads(r.read())["hits"]) == 10
            times.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"runs": runs, "median_s": statistics.median(times), "max_s": max(times)}


def peaks(minutes: float, identity: dict) -> dict:
    import soundfile as sf
    from starlette.testclient import TestClient

    from clapcli.index.store import IndexStore
    from clapcli.serve.app import ServeConfig, create_app

    folder = WORK / "long"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"long-{minutes:g}min.wav"
    sr = 16_000
    if not path.is_file():
        with sf.SoundFile(path, "w", sr, 1, "PCM_16") as f:
            rng = np.random.default_rng(0)
            for _ in range(int(minutes * 60)):
                f.write((0.3 * rng.standard_normal(sr)).astype(np.float32))
    index = WORK / f"index-long-{minutes:g}"
    if not (index / "index.sqlite").is_file():
        with IndexStore.open(index, create=True) as s:
            s.set_model_identity(identity)
            s.add_roots([str(folder.resolve())])
            vec = random_unit(1, int(identity["dim"]), seed=7)[0]
            st = path.stat()
            s.upsert_file(str(path.resolve()), st.st_size, st.st_mtime_ns, "bench-long", minutes * 60, sr, 1,
                          [(0.0, minutes * 60, "file", vec)])
    cache = Path(os.environ["CLAP_HOME"]) / "peaks"
    for old in cache.glob("*.json"):
        old.unlink()
    with TestClient(create_app(ServeConfig(index)), base_url="http://127.0.0.1:8765") as api:
        with C.Timer() as cold:
            assert api.get("/api/peaks/1").status_code == 200
        with C.Timer() as page:
            for _ in range(50):
                api.get("/api/peaks/1")
    return {"minutes": minutes, "cold_s": cold.seconds, "page_of_50_cached_s": page.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--map-files", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--startup-runs", type=int, default=3)
    parser.add_argument("--long-minutes", type=float, default=60)
    args = parser.parse_args()

    os.environ["CLAP_HOME"] = str(WORK / "home")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    info = C.machine_info()
    C.print_machine(info)
    identity = prepared_model(tiny_model())
    results = {"machine": info}
    index = store(args.files, identity, graph=True)
    # first, before this process has onnxruntime and the map in it: the server's start-up is timed alone
    results["startup"] = startup(index, args.startup_runs)
    print(f"start-up to the first answer: {json.dumps(results['startup'])}", flush=True)
    results["warm_query"] = warm_queries(index, args.queries)
    print(f"warm text query, {args.files} files, k 50: {json.dumps(results['warm_query'])}", flush=True)
    results["map"] = map_times(store(args.map_files, identity, graph=False))
    print(f"map, {args.map_files} files: {json.dumps(results['map'])}", flush=True)
    results["peaks"] = peaks(args.long_minutes, identity)
    print(f"peaks: {json.dumps(results['peaks'])}", flush=True)
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = C.RESULTS_DIR / f"serve-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"# results: {out}")


if __name__ == "__main__":
    main()
