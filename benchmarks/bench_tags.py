"""Tags stored in an index (issue 22): tagging every file of a large index from its stored vectors.

    python -m benchmarks.bench_tags                      # 100,000 files, esc50-sized and audioset-sized label sets
    python -m benchmarks.bench_tags --files 20000        # quicker

1. Store: --files random unit vectors of dim 512, one file-level vector per file (`bench_search.fill_store`), in
   one transaction (not timed as tagging).
2. For each label-set size (--labels, default 50 = esc50 and 527 = audioset): a zero-shot tag set with random
   unit label vectors and logit scale 100 (`index.tag_store.save_tag_set`; the text side, one pass of the text
   model over the prompts or a label-cache hit, is the same for 10 files or 100,000 and is not part of this),
   then `library.tags.tag_index` over the whole index: read the vectors, score, top --top, write the tags, one
   transaction. Wall time and files/s.
3. `library.tags.tag_new_files` after --new files are added (what `clap index` does after its commit): wall time.
4. `index.tag_store.tag_filter` for one label (what `clap search --tag` builds before searching): wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from . import _common as C
from .bench_search import fill_store, random_unit

DIM = 512
IDENTITY = {"model": "bench-random", "weights": "0" * 16, "frontend": {}, "fused": True, "dim": DIM}


def tag_whole_index(index_dir, n_labels: int, top_k: int, seed: int) -> dict:
    from clapcli.index.store import IndexStore
    from clapcli.index.tag_store import save_tag_set, tag_filter
    from clapcli.library.tags import index_fingerprint, tag_index

    labels = [f"label {i}" for i in range(n_labels)]
    with IndexStore.open(index_dir) as store:
        tag_set = save_tag_set(store, model=index_fingerprint(store), kind="zero-shot", name=f"random{n_labels}",
                               labels=labels, labels_hash=f"bench-{n_labels}-{seed}", templates=["{}"], top_k=top_k,
                               label_vectors=random_unit(n_labels, DIM, seed), logit_scale=100.0)
        with C.Timer() as t:
            run = tag_index(store, tag_set)
        with C.Timer() as f:
            keep = tag_filter(store, [labels[0]], [], [tag_set])
        kept = sum(keep(f"/bench/library/set{i % 100:02d}/clip{i:06d}.wav") for i in range(1000))
    return {"labels": n_labels, "top_k": top_k, "files": run.tagged, "tag_s": t.seconds,
            "files_per_s": run.tagged / t.seconds, "filter_s": f.seconds, "filter_kept_of_1000": kept}


def tag_new(index_dir, n_new: int, seed: int) -> dict:
    from clapcli.index.store import IndexStore
    from clapcli.library.tags import tag_new_files

    vectors = random_unit(n_new, DIM, seed)
    with IndexStore.open(index_dir) as store:
        with store.transaction():
            for i, v in enumerate(vectors):
                store.upsert_file(f"/bench/library/new/clip{i:06d}.wav", size=1000 + i, mtime_ns=i, content_hash=None,
                                  duration=8.0, sample_rate=48_000, channels=1, segments=[(0.0, 8.0, "file", v)])
        with C.Timer() as t:
            runs = tag_new_files(store)
    return {"new_files": n_new, "sets": len(runs), "tagged": sum(r.tagged for r in runs), "tag_new_s": t.seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000, help="files in the index (default 100000)")
    ap.add_argument("--labels", type=int, nargs="+", default=[50, 527], help="label-set sizes (default 50 527)")
    ap.add_argument("--top", type=int, default=5, help="labels stored per file (default 5)")
    ap.add_argument("--new", type=int, default=1000, help="files added before tag_new_files (default 1000)")
    args = ap.parse_args(argv)

    info = C.machine_info()
    C.print_machine(info)
    index_dir = C.WORK / "tags-index"
    shutil.rmtree(index_dir, ignore_errors=True)
    fill = fill_store(index_dir, random_unit(args.files, DIM, seed=0), per_file=1, identity=IDENTITY)
    print(f"# store: {fill['files']:,} files written in {fill['insert_s']:.1f} s")
    rows = [tag_whole_index(index_dir, n, args.top, seed=1 + i) for i, n in enumerate(args.labels)]
    new = tag_new(index_dir, args.new, seed=99)
    print(C.markdown_table(["labels", "top k", "files", "tag all (s)", "files/s", "--tag filter (s)"],
                           [[r["labels"], r["top_k"], f"{r['files']:,}", r["tag_s"], f"{r['files_per_s']:,.0f}",
                             r["filter_s"]] for r in rows]))
    print(f"tag_new_files: {new['tagged']:,} new files in {new['sets']} sets in {new['tag_new_s']:.2f} s")
    info["load_average_after"] = [round(x, 2) for x in C.load_average()]
    out = C.RESULTS_DIR / f"bench_tags-{int(time.time())}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "fill": fill, "tag": rows, "new": new}, indent=1))
    print(f"# raw numbers: {out}")
    shutil.rmtree(index_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
