"""`clap index` sharded over two torchrun ranks (Gloo on the CPU): the merged index equals a single-process
build, each rank embeds its own share, a rank that fails fails the run with the index unchanged, and what the
ranks embedded is kept in partitions until it is committed, so a failed merge resumes instead of re-embedding."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cli_runner import clap
from clapcli.records import AudioEmbedding, Segment
from clapcli.index.distributed import (kept_results, partition_paths, read_partition, share_by_size,
                                       wait_for_partitions, write_partition)
from clapcli.index.store import IndexStore
from library import make_library
from test_cli_index_search import assert_same_contents, index_contents, json_lines

PROBE = Path(__file__).parent / "dist_probe.py"

# (relative path, seconds, sample rate, channels, subtype): mixed formats and sizes; two files > 10 s so
# window segments are merged too
FILES = [
    ("drums/kick.wav", 0.3, 44_100, 1, "PCM_16"),
    ("drums/snare.flac", 0.6, 48_000, 2, None),
    ("drums/hat.ogg", 0.8, 22_050, 1, None),
    ("fx/whoosh.mp3", 1.5, 44_100, 2, None),
    ("fx/riser.wav", 4.0, 48_000, 2, "PCM_24"),
    ("ambience/street.flac", 12.5, 44_100, 1, None),
    ("ambience/rain.mp3", 16.0, 44_100, 1, None),
    ("voice/count.aiff", 2.0, 16_000, 1, "PCM_16"),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-library")
    make_library(root, good=FILES)  # with three broken files: errors are merged too
    return root


def torchrun(*args, script: Path | None = None, probe: Path | None = None, fail_rank: int | None = None,
             full_disk_after: int | None = None, late_rank: int | None = None):
    """`python -m torch.distributed.run --nproc-per-node 2 -m clapcli ARGS` (or SCRIPT ARGS), on the CPU; the
    keywords are dist_probe.py's faults."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if probe is not None:
        env["CLAP_PROBE_DIR"] = str(probe)
        env["CLAP_PROBE_EXACT_BELOW"] = "0"  # rank 0 writes the hnswlib file even for this small index
    if fail_rank is not None:
        env["CLAP_PROBE_FAIL_RANK"] = str(fail_rank)
    if full_disk_after is not None:
        env["CLAP_PROBE_FULL_DISK_AFTER"] = str(full_disk_after)
    if late_rank is not None:
        env["CLAP_PROBE_LATE_RANK"] = str(late_rank)
    target = [str(script)] if script else ["-m", "clapcli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *target,
           *[str(a) for a in args]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def index_args(root: Path, index_dir: Path, model: Path) -> list:
    return ["index", root, "--index", index_dir, "--model", model, "--workers", "0", "--json", "--batch-size", "2"]


def search(index_dir: Path, *query) -> list[tuple[str, float]]:
    hits = json_lines(clap("search", *query, "--index", index_dir, "-k", "20", "--json").stdout)
    return [(h["path"], h["score"], h["start"]) for h in hits]


def assert_same_search(a: Path, b: Path, *query) -> None:
    hits_a, hits_b = search(a, *query), search(b, *query)
    assert [(p, s) for p, _, s in hits_a] == [(p, s) for p, _, s in hits_b]
    assert [sa for _, sa, _ in hits_a] == pytest.approx([sb for _, sb, _ in hits_b], abs=1e-5)


def test_shares_are_balanced_by_size_and_deterministic():
    sizes = [900, 10, 500, 400, 0, 0, 300, 300, 5]
    owner = share_by_size(sizes, 3)
    # largest first onto the least-loaded rank: 900→0, 500→1, 400→2, 300→2, 300→1, then the small ones→2
    assert owner == [0, 2, 1, 2, 2, 2, 2, 1, 2]
    assert owner == share_by_size(list(sizes), 3)
    loads = [sum(s for s, o in zip(sizes, owner) if o == r) for r in range(3)]
    assert loads == [900, 800, 715]
    assert share_by_size(sizes, 1) == [0] * len(sizes)


def test_a_partition_holds_files_segments_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    vec = lambda: rng.standard_normal(4).astype(np.float32)  # noqa: E731
    results = [
        AudioEmbedding("/a.wav", 2.5, vec(), sample_rate=44_100, channels=2, partial="truncated after 2.5 s"),
        AudioEmbedding("/b.flac", 25.0, vec(), [Segment(0.0, 10.0, vec()), Segment(10.0, 20.0, vec()),
                                                 Segment(15.0, 25.0, vec())], sample_rate=48_000, channels=1),
        AudioEmbedding("/c.mp3", 0.0, None, error="cannot be decoded (x)"),
    ]
    producer = {"model": "f00d", "precision": "fp32", "engine": "torch", "clap": "0.1.0"}
    write_partition(tmp_path, 3, results, producer, {"/a.wav": (1, 2), "/b.flac": (3, 4), "/c.mp3": (5, 6)})
    back = list(read_partition(tmp_path, 3))
    assert [(r.path, r.duration, r.error, r.sample_rate, r.channels, r.partial) for r in back] == \
        [(r.path, r.duration, r.error, r.sample_rate, r.channels, r.partial) for r in results]
    for got, want in zip(back, results):
        assert (got.embedding is None) == (want.embedding is None)
        if want.embedding is not None:
            assert np.array_equal(got.embedding, want.embedding)
        assert [(s.start, s.end) for s in got.segments] == [(s.start, s.end) for s in want.segments]
        assert all(np.array_equal(a.embedding, b.embedding) for a, b in zip(got.segments, want.segments))
    write_partition(tmp_path, 4, [], producer, {})
    assert list(read_partition(tmp_path, 4)) == []


def test_only_partitions_of_the_same_model_and_file_state_are_kept(tmp_path):
    rng = np.random.default_rng(1)
    vec = lambda: rng.standard_normal(4).astype(np.float32)  # noqa: E731
    producer = {"model": "f00d", "precision": "fp32", "engine": "torch", "clap": "0.1.0"}
    stats = {"/a.wav": (10, 100), "/b.wav": (20, 200), "/c.wav": (30, 300), "/d.wav": (40, 400), "/e.wav": (50, 500)}
    runs = [tmp_path / name for name in ("run-a", "run-b", "run-c", "run-d")]
    for run in runs:
        run.mkdir()
    a = AudioEmbedding("/a.wav", 25.0, vec(), [Segment(0.0, 10.0, vec()), Segment(10.0, 20.0, vec())])
    write_partition(runs[0], 0, [
        a,
        AudioEmbedding("/b.wav", 1.0, vec()),  # the file changed since: stale
        AudioEmbedding("/c.wav", 0.0, None, error="cannot be read (EIO)"),  # failed: gets another try
        AudioEmbedding("/d.wav", 1.0, vec(), partial="truncated after 1 s"),  # decoded in part: another try
    ], producer, {**stats, "/b.wav": (20, 199)})
    write_partition(runs[1], 0, [AudioEmbedding("/e.wav", 1.0, vec())], {**producer, "precision": "int8"}, stats)
    write_partition(runs[2], 1, [AudioEmbedding("/e.wav", 1.0, vec())], producer, stats)
    partition_paths(runs[2], 1)[1].write_text('{"rank": 1, "rows":')  # damaged
    write_partition(runs[3], 0, [AudioEmbedding("/e.wav", 1.0, vec())], producer, stats)
    partition_paths(runs[3], 0)[0].unlink()  # its vectors are gone

    kept = kept_results(runs, producer, stats)
    assert sorted(kept) == ["/a.wav"]
    part, i = kept["/a.wav"]
    got = part.result(i)
    assert np.array_equal(got.embedding, a.embedding)
    assert [(s.start, s.end) for s in got.segments] == [(0.0, 10.0), (10.0, 20.0)]
    assert all(np.array_equal(x.embedding, y.embedding) for x, y in zip(got.segments, a.segments))
    assert kept_results(runs, {**producer, "model": "beef"}, stats) == {}
    assert kept_results(runs, producer, {**stats, "/a.wav": (11, 100)}) == {}


def test_a_partition_that_shows_up_late_is_waited_for_and_a_missing_one_is_named(tmp_path):
    producer = {"model": "f00d", "precision": "fp32", "engine": "torch", "clap": "0.1.0"}
    write_partition(tmp_path, 0, [], producer, {})
    late = threading.Timer(0.5, write_partition, (tmp_path, 1, [], producer, {}))
    late.start()
    started = time.monotonic()
    assert wait_for_partitions(tmp_path, [0, 1], timeout=30, pauses=(0.01, 0.2)) == []
    late.join()
    assert 0.5 <= time.monotonic() - started < 10

    started = time.monotonic()
    assert wait_for_partitions(tmp_path, [0, 1, 2, 3], timeout=0.3, pauses=(0.01, 0.1)) == [2, 3]
    assert 0.3 <= time.monotonic() - started < 5
    assert wait_for_partitions(tmp_path / "not-yet", [0], timeout=0.05, pauses=(0.01, 0.1)) == [0]


@pytest.fixture(scope="module")
def single(library, tiny_model_dir, tmp_path_factory):
    """The library indexed by one process: what every sharded build must equal."""
    index_dir = tmp_path_factory.mktemp("dist-single") / "idx"
    clap(*index_args(library, index_dir, tiny_model_dir))
    return index_dir


def test_two_ranks_build_the_index_one_process_builds(library, single, tiny_model_dir, tmp_path):
    sharded, probe = tmp_path / "sharded", tmp_path / "probe"
    probe.mkdir()
    proc = torchrun(*index_args(library, sharded, tiny_model_dir), "--device", "cpu", script=PROBE, probe=probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = json_lines(proc.stdout)  # rank 0 alone reports
    assert (summary["added"], summary["skipped"], summary["total_files"]) == (len(FILES), 3, len(FILES))

    shares = [json.loads((probe / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])  # both ranks worked, disjointly
    assert sorted(shares[0] + shares[1]) == sorted(index_contents(single))

    assert_same_contents(index_contents(single), index_contents(sharded))
    assert (sharded / "vectors.hnsw").is_file()  # rank 0 built the hnswlib file of the merged store
    assert not (sharded / ".partitions").exists()
    assert_same_search(single, sharded, "a kick drum")
    assert_same_search(single, sharded, "--audio", library / "ambience/rain.mp3")


def test_a_failing_rank_fails_the_run_and_changes_nothing(library, single, tiny_model_dir, tmp_path):
    index_dir, probe = tmp_path / "idx", tmp_path / "probe"
    probe.mkdir()
    shutil.copytree(single, index_dir)
    with IndexStore.open(index_dir) as store:  # two files for the run to embed again
        store.remove_files([p for p in store.file_states() if "/ambience/" in p])
    before = index_contents(index_dir)

    proc = torchrun(*index_args(library, index_dir, tiny_model_dir), "--device", "cpu", script=PROBE, probe=probe,
                    fail_rank=1)
    assert proc.returncode != 0
    assert "sharded indexing failed, nothing was committed: rank 1 of 2: RuntimeError: injected failure" \
        in proc.stderr, proc.stderr[-3000:]
    assert json_lines(proc.stdout) == []
    assert json.loads((probe / "rank-1.json").read_text())  # rank 1 had files to embed when it failed
    assert_same_contents(before, index_contents(index_dir))
    assert len(before) == len(FILES) + 3 - 2
    # rank 0's finished partition is kept for the next run to merge; rank 1 wrote none
    (kept,) = (index_dir / ".partitions").glob("*/part-*.json")
    assert kept.name == "part-00000.json"
    assert "the partitions written are kept in" in proc.stderr
    assert [r.path for r in read_partition(kept.parent, 0)] == json.loads((probe / "rank-0.json").read_text())


@pytest.mark.slow
def test_an_incremental_sharded_run_adds_only_the_new_files(library, single, tiny_model_dir, tmp_path):
    """`-m clapcli` as documented: a second sharded run embeds only what the first one lacked."""
    root, index_dir = tmp_path / "lib", tmp_path / "idx"
    shutil.copytree(library, root, copy_function=os.link)  # same paths' content, same mtimes
    (root / "ambience").rename(tmp_path / "aside")
    first = torchrun(*index_args(root, index_dir, tiny_model_dir), "--device", "cpu")
    assert first.returncode == 0, first.stderr[-3000:]
    (tmp_path / "aside").rename(root / "ambience")
    proc = torchrun(*index_args(root, index_dir, tiny_model_dir), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = json_lines(proc.stdout)
    assert (summary["added"], summary["unchanged"]) == (2, len(FILES) + 3 - 2)
    expected = {path.replace(str(library), str(root), 1): v for path, v in index_contents(single).items()}
    assert_same_contents(expected, index_contents(index_dir))


def embedded_by_ranks(probe: Path) -> list[str]:
    """The paths the ranks were given to embed (the probe writes nothing where a rank embedded nothing)."""
    return sorted(p for f in probe.glob("rank-*.json") for p in json.loads(f.read_text()))


def test_a_failed_merge_keeps_what_it_committed_and_the_partitions_and_a_rerun_merges_them(
        library, single, tiny_model_dir, tmp_path):
    index_dir, probe = tmp_path / "idx", tmp_path / "probe"
    probe.mkdir()
    args = [*index_args(library, index_dir, tiny_model_dir), "--device", "cpu", "--commit-every", "2"]
    proc = torchrun(*args, script=PROBE, probe=probe, full_disk_after=2)  # the disk fills after one batch
    assert proc.returncode != 0
    assert "sharded indexing failed while merging: OSError: [Errno 28] No space left on device" in proc.stderr, \
        proc.stderr[-3000:]
    assert "rank 0 failed to commit the merged partitions" in proc.stderr  # rank 1 says so too
    expected = index_contents(single)
    committed = index_contents(index_dir)
    assert len(committed) == 2  # the first batch stays
    assert_same_contents({p: expected[p] for p in committed}, committed)
    assert sorted(p.name for p in (index_dir / ".partitions").glob("*/part-*.json")) == \
        ["part-00000.json", "part-00001.json"]
    assert embedded_by_ranks(probe) == sorted(expected)  # the first run embedded everything

    shutil.rmtree(probe)
    probe.mkdir()
    proc = torchrun(*args, script=PROBE, probe=probe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = json_lines(proc.stdout)
    assert (summary["added"] + summary["skipped"], summary["unchanged"], summary["total_files"]) == \
        (len(FILES) + 3 - 2, 2, len(FILES))
    # Only the files that could not be decoded get another try; every embedding comes from the partitions.
    failed = {p for p, (*_, error, _segs) in expected.items() if error}
    assert len(failed) == 3
    assert embedded_by_ranks(probe) == sorted(failed - set(committed))
    resumed = index_contents(index_dir)
    assert_same_contents(expected, resumed)
    for path, (*_, segs) in expected.items():
        for a, b in zip(segs, resumed[path][-1]):
            assert np.abs(a[3] - b[3]).max() <= 1e-6, path
    assert not (index_dir / ".partitions").exists()
    assert_same_search(single, index_dir, "a kick drum")


def test_a_partition_that_shows_up_late_on_a_shared_filesystem_is_waited_for(library, single, tiny_model_dir,
                                                                               tmp_path):
    index_dir, probe = tmp_path / "idx", tmp_path / "probe"
    probe.mkdir()
    proc = torchrun(*index_args(library, index_dir, tiny_model_dir), "--device", "cpu", script=PROBE, probe=probe,
                    late_rank=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = [d for d in tmp_path.iterdir() if d.name.startswith("tmp")]  # where rank 1 wrote it first
    assert list(aside.iterdir()) == []  # moved into place, late
    assert_same_contents(index_contents(single), index_contents(index_dir))
    assert not (index_dir / ".partitions").exists()


def test_the_partitions_may_go_only_once_a_rebuild_has_swapped_its_store_in(library, single, tiny_model_dir,
                                                                             tmp_path):
    """`on_committed` (where a sharded run deletes its partitions) runs after the rebuild's swap, not when the
    last batch reached the rebuild's staging store, which a failed final checkpoint or swap throws away."""
    from clapcli.engine.load import load_model
    from clapcli.index.indexer import REBUILD_DIR, build_index

    index_dir = tmp_path / "idx"
    shutil.copytree(single, index_dir)
    model = load_model(tiny_model_dir, device="cpu")
    seen = []

    def on_committed():
        with IndexStore.open(index_dir, readonly=True) as store:
            seen.append(((index_dir / REBUILD_DIR).exists(), store.index_uuid))

    build_index([library], index_dir, lambda name: model, batch_size=2, rebuild=True, on_committed=on_committed)
    with IndexStore.open(single, readonly=True) as old, IndexStore.open(index_dir, readonly=True) as new:
        assert new.index_uuid != old.index_uuid
        assert seen == [(False, new.index_uuid)]  # the new store was in place
