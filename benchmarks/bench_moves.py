"""Renaming a folder of 10,000 indexed files: a metadata operation (issue #20), timed through `clap index`.

    python -m benchmarks.bench_moves                 # 10,000 files
    python -m benchmarks.bench_moves --files 2000    # quicker

1. Library: --files short WAVs (0.1 s of noise, 16 kHz, a different seed each, so every content hash
   differs) in 100 folders under `_work/moves/library/sfx`.
2. Store: one row per file written directly through `IndexStore.upsert_file` (the file's real size, mtime
   and content hash; one random 512-d unit vector), roots = the library, and the hnswlib graph built, as a
   `clap index` run would leave them. The model identity names a model folder that does not exist, so a run
   that tried to load the model would fail: every timed run below proves by succeeding that it loaded none.
3. Timed, as subprocesses of the installed `clap` (wall clock, process start included):
   - `clap index --index DIR --json` with nothing changed (the floor: scan and stat of every file);
   - the same after `sfx` is renamed to `effects` (every path new: each new file is hashed, each gone
     path's hash is read from the store, and the rows move in one transaction);
   and the store is checked: the same file ids and vector blobs under the new paths.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import subprocess
import wave
from pathlib import Path

import numpy as np

from . import _common as C

DIM = 512
MISSING_MODEL = "/nonexistent/bench-moves-model"  # never loadable: a model load fails the run


def make_library(root: Path, files: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(files):
        path = root / f"set{i % 100:02d}" / f"clip{i:06d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        samples = (rng.standard_normal(1600) * 3000).astype("<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16_000)
            w.writeframes(samples.tobytes())
        paths.append(path.resolve())
    return paths


def fill_store(index_dir: Path, library: Path, paths: list[Path]) -> float:
    from clapcli.index.ann import AnnIndex
    from clapcli.index.store import IndexStore, content_hash

    rng = np.random.default_rng(1)
    with C.Timer() as t:
        with IndexStore.open(index_dir, create=True) as store:
            store.set_model_identity({"model": MISSING_MODEL, "dim": DIM})
            with store.transaction():
                store.add_roots([str(library.resolve())])
                for path in paths:
                    st = path.stat()
                    v = rng.standard_normal(DIM).astype(np.float32)
                    store.upsert_file(path, st.st_size, st.st_mtime_ns, content_hash(path), 0.1, 16_000, 1,
                                      [(0.0, 0.1, "file", v / np.linalg.norm(v))])
            AnnIndex.sync(store, persist=True)
    return t.seconds


def rows(index_dir: Path) -> dict[str, tuple[int, bytes]]:
    con = sqlite3.connect(f"file:{index_dir / 'index.sqlite'}?mode=ro", uri=True)
    found = con.execute("SELECT f.path, f.id, e.vector FROM files f JOIN segments s ON s.file_id = f.id "
                        "JOIN embeddings e ON e.segment_id = s.id").fetchall()
    con.close()
    return {path: (file_id, blob) for path, file_id, blob in found}


def timed_index(index_dir: Path) -> tuple[float, dict]:
    exe = C.clap_executable()
    if exe is None:
        raise SystemExit("the `clap` entry point is not installed (pip install -e .)")
    with C.Timer() as t:
        proc = subprocess.run([exe, "index", "--index", str(index_dir), "--json"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"clap index failed (a model load would: {MISSING_MODEL} does not exist):\n{proc.stderr}")
    return t.seconds, C.last_json_line(proc.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=10_000, help="indexed files in the renamed folder (default 10000)")
    args = ap.parse_args(argv)
    info = C.machine_info()
    C.print_machine(info)
    work = C.WORK / "moves"
    shutil.rmtree(work, ignore_errors=True)
    library, index_dir = work / "library", work / "index"
    with C.Timer() as t:
        paths = make_library(library / "sfx", args.files)
    print(f"library: {args.files} files written in {t.seconds:.1f} s")
    print(f"store: {args.files} rows and the graph in {fill_store(index_dir, library, paths):.1f} s")
    before = rows(index_dir)

    unchanged_s, s = timed_index(index_dir)
    assert s["unchanged"] == args.files and s["moved"] == 0, s
    print(f"clap index, nothing changed: {unchanged_s:.2f} s")
    (library / "sfx").rename(library / "effects")
    moved_s, s = timed_index(index_dir)
    assert (s["moved"], s["added"], s["removed"], s["audio_seconds"]) == (args.files, 0, 0, 0), s
    after = rows(index_dir)
    renamed = {str(p).replace(f"{library.resolve()}/sfx/", f"{library.resolve()}/effects/", 1): v
               for p, v in before.items()}
    assert after == renamed, "the moved rows lost their ids or vectors"
    print(f"clap index after renaming the folder: {moved_s:.2f} s ({s['moved']} moved, no model load, "
          "ids and vectors kept)")
    again_s, s = timed_index(index_dir)
    print(f"clap index again: {again_s:.2f} s ({s['unchanged']} unchanged)")
    result = dict(machine=info, files=args.files, unchanged_s=unchanged_s, renamed_folder_s=moved_s,
                  again_s=again_s)
    print(f"# results: {C.write_result('bench_moves', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
