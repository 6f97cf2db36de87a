"""`clap index` sharded over torchrun ranks: rank 0 plans and commits, every rank embeds a share.

    torchrun --nproc-per-node 4 -m clapcli index ~/samples
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m clapcli index /shared/samples --index /shared/indexes/sfx

The pattern is clip-retrieval's, on torch.distributed alone (no scheduler of our own):

1. Every rank gets the same `build.IndexRequest` (the command's options) and loads the model from it. Rank 0
   runs the ordinary `indexer.build_index`: it alone takes the writer lock, scans, compares the scan
   with the store and loads the model. Its model is wrapped so that embedding the plan's files means:
2. rank 0 looks for partitions that earlier runs left under `INDEX/.partitions/` (a run that failed) and
   keeps every result there that the same model made from the same file (`made_by`, and the size and mtime
   the scan sees now); a stale one is never merged;
3. rank 0 splits the other files into one share per rank (`share_by_size`: balanced in bytes,
   deterministic) and broadcasts the shares, their sizes and mtimes, the model's reference and fingerprint,
   and a run directory under `INDEX/.partitions/`;
4. every rank, rank 0 included, embeds its share with the same model (a rank that loads other weights
   fails) and writes a partition: `part-RRRRR.npy` (float32 vectors) and `part-RRRRR.json` (who made it;
   files with size, mtime, durations, errors, segments, rows), each atomically;
5. rank 0 gathers every rank's outcome, waits (with back-off, up to PARTITION_WAIT_SECONDS) until it sees
   every partition, and broadcasts the verdict;
6. rank 0 merges the kept and new results in the scan's order through the single-process commit code, in
   batches of `--commit-every` files, each its own transaction; once everything is committed (and a
   `--rebuild` has swapped its new store in) it deletes the partitions, syncs the hnswlib file and tells the
   other ranks, which exit 0 having written nothing to the store.

Any failure makes every rank exit non-zero. Partitions are kept until their rows are committed: after a
failing rank, nothing is committed and the partitions of the ranks that finished stay; after a failure in
the merge (a full disk), the committed batches stay in the index and every partition stays. The same
command run again merges what is kept instead of embedding it again. Only whole embeddings are taken from
kept partitions: a file that failed or decoded in part is embedded again, so a passing fault gets a retry.
A rank killed outright (SIGKILL, out of memory) makes torchrun stop the others; the partitions written
by then are kept the same way. A successful sharded run deletes every partition it found.

With several nodes the index directory must be on a filesystem every node sees (rank 0 reads the other
ranks' partitions there), and the model must load under the same name on every node. Coordination runs
on a Gloo group of its own, also when the models run on NCCL, with a long timeout: the other ranks wait
there while rank 0 scans, and everyone waits there for the slowest share.
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch.distributed as torch_dist

from .. import dist
from ..atomic import atomic_write, write_npy
from ..errors import ClapError
from ..records import AudioEmbedding, Segment
from ..version import __version__
from . import indexer
from .build import IndexRequest, ModelLoader, index_options
from .schema import PARTITIONS_DIR
from .summary import IndexSummary

COORDINATION_TIMEOUT = timedelta(days=7)  # how long ranks wait for each other (a scan, the slowest share)
PARTITION_WAIT_SECONDS = 120.0  # how long rank 0 waits to see a finished rank's partition (a slow shared fs)
PARTITION_POLL_SECONDS = (0.05, 5.0)  # first and longest pause between two looks: doubling in between


def share_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank that embeds each file: largest first onto the least-loaded rank (ties: the lower rank).

    Balanced in bytes, and the same assignment for the same list on every rank and every run."""
    owner = [0] * len(sizes)
    loads = [(0, rank) for rank in range(world_size)]  # (bytes so far, rank): a heap
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(loads)
        owner[i] = rank
        heapq.heappush(loads, (load + sizes[i] + 1, rank))  # +1: empty files spread too
    return owner


# ---------------------------------------------------------------------------------------------------------
# Partition files


def made_by(model) -> dict:
    """What a partition records about the model that made it; a later run merges it only when it is equal:
    the same weights, front end and dim (the fingerprint), precision, audio engine and clap version."""
    return {"model": model.fingerprint, "precision": model.precision, "engine": getattr(model, "engine", None),
            "clap": __version__}


def partition_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    """(vectors .npy, records .json) of one rank's partition; the .json is written last."""
    stem = directory / f"part-{rank:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def write_partition(directory: Path, rank: int, results: Iterable[AudioEmbedding], producer: dict,
                    stats: Mapping[str, tuple[int, int]]) -> int:
    """Write one rank's results; returns how many files it holds. `producer` is `made_by(model)`; `stats`
    the (size, mtime_ns) the scan saw of each file. Each file's vectors are consecutive rows: the file
    embedding, then its windows in order."""
    records, vectors = [], []
    for result in results:
        size, mtime_ns = stats[result.path]
        record = {"path": result.path, "size": size, "mtime_ns": mtime_ns, "duration": result.duration,
                  "error": result.error, "error_kind": result.error_kind, "sample_rate": result.sample_rate,
                  "channels": result.channels, "partial": result.partial}
        if result.error is None:
            record["row"] = len(vectors)
            record["segments"] = [[s.start, s.end] for s in result.segments]
            vectors.append(np.asarray(result.embedding, dtype=np.float32))
            vectors.extend(np.asarray(s.embedding, dtype=np.float32) for s in result.segments)
        records.append(record)
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)  # (rows, D)
    npy, meta = partition_paths(directory, rank)
    write_npy(npy, matrix)
    atomic_write(meta, json.dumps({"rank": rank, "rows": len(vectors), "made_by": producer, "files": records}))
    return len(records)


class Partition:
    """One partition read back: its records at once, its vectors memory-mapped.

    Raises OSError or ValueError when the files are missing, unfinished or do not fit together."""

    def __init__(self, meta: Path):
        doc = json.loads(meta.read_text())
        self.made_by: dict = doc["made_by"]
        self.records: list[dict] = doc["files"]
        self._vectors = np.load(meta.with_suffix(".npy"), mmap_mode="r") if doc["rows"] else None  # (rows, D)
        rows = 0 if self._vectors is None else self._vectors.shape[0]
        if rows != doc["rows"] or not isinstance(self.records, list):
            raise ValueError(f"{meta} does not match its vectors")

    def result(self, i: int) -> AudioEmbedding:
        rec = self.records[i]
        if rec["error"] is not None:
            return AudioEmbedding(rec["path"], rec["duration"], None, error=rec["error"],
                                  sample_rate=rec["sample_rate"], channels=rec["channels"],
                                  error_kind=rec.get("error_kind"))
        row = rec["row"]
        segments = [Segment(start, end, np.array(self._vectors[row + 1 + k]))
                    for k, (start, end) in enumerate(rec["segments"])]
        return AudioEmbedding(rec["path"], rec["duration"], np.array(self._vectors[row]), segments,
                              sample_rate=rec["sample_rate"], channels=rec["channels"], partial=rec["partial"])


def read_partition(directory: Path, rank: int) -> Iterator[AudioEmbedding]:
    """The results of one partition, in the order they were written."""
    part = Partition(partition_paths(directory, rank)[1])
    return (part.result(i) for i in range(len(part.records)))


def kept_results(run_dirs: Iterable[Path], producer: dict,
                 stats: Mapping[str, tuple[int, int]]) -> dict[str, tuple[Partition, int]]:
    """{path: (partition, record)} of the results in earlier runs' partitions that are still good: made by
    `producer`, of a file in `stats` whose (size, mtime_ns) is still the one recorded, and whole (a file
    that failed or decoded in part is left out, so it gets embedded again). A partition that cannot be read
    (unfinished, damaged) is passed over."""
    found: dict[str, tuple[Partition, int]] = {}
    for run_dir in run_dirs:
        for meta in sorted(run_dir.glob("part-*.json")):
            try:
                part = Partition(meta)
                if part.made_by != producer:
                    continue
                for i, rec in enumerate(part.records):
                    stat = stats.get(rec["path"])
                    if stat is not None and [rec["size"], rec["mtime_ns"]] == list(stat) \
                            and rec["error"] is None and rec["partial"] is None:
                        found[rec["path"]] = (part, i)
            except (OSError, ValueError, KeyError, TypeError):
                continue
    return found


def wait_for_partitions(directory: Path, ranks: Iterable[int], timeout: float = PARTITION_WAIT_SECONDS,
                        pauses: tuple[float, float] = PARTITION_POLL_SECONDS) -> list[int]:
    """The ranks whose partition (both files) still cannot be seen in `directory` after `timeout` seconds.

    Looks again after a pause that doubles from `pauses[0]` to `pauses[1]`: on a shared filesystem another
    node's files can show up seconds after they were written. Each look lists the directory, which also
    makes an NFS client revalidate what it has cached of it."""
    missing = list(ranks)
    pause, deadline = pauses[0], time.monotonic() + timeout
    while True:
        try:
            names = set(os.listdir(directory))
        except FileNotFoundError:
            names = set()
        missing = [r for r in missing if not all(p.name in names for p in partition_paths(directory, r))]
        left = deadline - time.monotonic()
        if not missing or left <= 0:
            return missing
        time.sleep(min(pause, left))
        pause = min(2 * pause, pauses[1])


# ---------------------------------------------------------------------------------------------------------
# Coordination


@dataclass(frozen=True)
class WorkOrder:
    """What rank 0 broadcasts once it knows what to embed."""

    model_ref: str  # how every rank loads the model
    fingerprint: str  # the weights every rank must have loaded
    paths: list[str]  # the files to embed, in the scan's order
    stats: list[tuple[int, int]]  # (size, mtime_ns) of each as the scan saw it: recorded in the partition
    owner: list[int]  # the rank that embeds each of them
    directory: str  # where the partitions go


class _Coordinator:
    """The collectives of one sharded run, on a Gloo group of its own (objects only, long timeout)."""

    def __init__(self, ctx: dist.DistContext):
        self.ctx = ctx
        self.group = torch_dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
        self.stage = "planning"  # rank 0: planning → (embedding →) merging → merged, or failed
        self.ordered = False  # whether the other ranks were sent a work order (else they wait for one)

    def broadcast(self, obj=None):
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list | None:
        out = [None] * self.ctx.world_size if self.ctx.is_main else None
        torch_dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        torch_dist.barrier(group=self.group)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, ClapError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _embed_share(co: _Coordinator, order: WorkOrder, load: Callable[[], object], batch_size: int,
                 workers: int) -> None:
    """Embed this rank's share into its partition, then agree with every rank on the outcome.

    Returns when every rank succeeded and rank 0 sees every partition; otherwise raises on every rank. The
    partitions that were written are kept: the next run merges them instead of embedding those files again."""
    rank, world = co.ctx.rank, co.ctx.world_size
    directory = Path(order.directory)
    mine = [path for path, owner in zip(order.paths, order.owner) if owner == rank]
    error: BaseException | None = None
    try:
        model = load()
        directory.mkdir(parents=True, exist_ok=True)  # made by rank 0; another node may not see it yet
        write_partition(directory, rank, model.embed_files(mine, batch_size=batch_size, segments=True,
                                                           workers=workers),
                        made_by(model), dict(zip(order.paths, order.stats)))
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, raised again below on every rank
        error = exc
    outcomes = co.gather(None if error is None else _describe(error))
    verdict = None
    if co.ctx.is_main:
        failed = [f"rank {r} of {world}: {why}" for r, why in enumerate(outcomes) if why is not None]
        if failed:
            verdict = "; ".join(failed)
        else:
            unseen = wait_for_partitions(directory, range(world))
            if unseen:
                verdict = (f"rank 0 cannot see the partitions of rank {', '.join(map(str, unseen))} in {directory} "
                           f"after {PARTITION_WAIT_SECONDS:g} s: with several nodes the index must be on a "
                           "filesystem every node sees")
    verdict = co.broadcast(verdict)
    if verdict is None:
        return
    co.stage = "failed"
    if isinstance(error, KeyboardInterrupt):
        raise error
    raise ClapError(f"sharded indexing failed, nothing was committed: {verdict}; the partitions written are kept "
                    f"in {directory.parent} and the same command run again merges them") from error


class _ShardedModel:
    """Rank 0's model as `indexer.build_index` sees it: `embed_files` merges what kept partitions hold, shares
    the other files among the ranks and returns every result in the scan's order; the indexer commits them in
    batches, and `merged` is called once everything is committed."""

    def __init__(self, model, co: _Coordinator, index_dir: Path, plans: list):
        self._model, self._co, self._index_dir, self._plans = model, co, index_dir, plans
        self._embedded = False
        self._run_dirs: list[Path] = []  # the partitions this run reads, deleted once all is committed

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def partitions(self) -> Path:
        return self._index_dir / PARTITIONS_DIR

    def embed_files(self, paths, batch_size: int = 8, segments: bool = True, workers: int = 0):
        if self._embedded or not segments:
            raise RuntimeError("a sharded index run embeds its plan once, with segments")
        self._embedded = True
        paths = [os.fspath(p) for p in paths]
        (plan,) = self._plans
        scanned = {str(e.path): (e.size, e.mtime_ns) for e in plan.to_embed}
        stats = {p: scanned[p] for p in paths}
        # This process holds the writer lock: no other run writes partitions meanwhile.
        self._run_dirs = sorted(d for d in self.partitions.iterdir() if d.is_dir()) if self.partitions.is_dir() else []
        sources = kept_results(self._run_dirs, made_by(self._model), stats)
        todo = [p for p in paths if p not in sources]
        if todo:
            run_dir = self.partitions / uuid.uuid4().hex
            run_dir.mkdir(parents=True)
            self._run_dirs.append(run_dir)
            order = WorkOrder(self._model.model_ref, self._model.fingerprint, todo, [stats[p] for p in todo],
                              share_by_size([stats[p][0] for p in todo], self._co.ctx.world_size), str(run_dir))
            self._co.stage, self._co.ordered = "embedding", True
            self._co.broadcast(("work", order))
            _embed_share(self._co, order, lambda: self._model, batch_size, workers)
            sources.update(_new_results(order, self._co.ctx.world_size))
        self._co.stage = "merging"
        return (sources[p][0].result(sources[p][1]) for p in paths)

    def merged(self) -> None:
        """Every result is committed: delete the partitions this run read (or wrote), and any stale ones there."""
        self._co.stage = "merged"
        for run_dir in self._run_dirs:
            shutil.rmtree(run_dir, ignore_errors=True)
        try:
            self.partitions.rmdir()
        except OSError:
            pass  # not empty, or already gone


def _new_results(order: WorkOrder, world_size: int) -> dict[str, tuple[Partition, int]]:
    """{path: (partition, record)} of this run's partitions, each checked to hold its rank's share."""
    directory, found = Path(order.directory), {}
    for rank in range(world_size):
        share = [path for path, owner in zip(order.paths, order.owner) if owner == rank]
        part = Partition(partition_paths(directory, rank)[1])
        if [rec["path"] for rec in part.records] != share:
            raise ClapError(f"the partition of rank {rank} in {directory} does not hold its share")
        found.update((path, (part, i)) for i, path in enumerate(share))
    return found


# ---------------------------------------------------------------------------------------------------------
# Entry point


def build(request: IndexRequest, *, on_plan: Callable | None = None, on_file: Callable | None = None,
          on_audio: Callable | None = None) -> IndexSummary | None:
    """`build.build` shared by the ranks of this job; joins (and leaves) the process group.

    Every rank loads the model as `request` says (`build.ModelLoader`). Returns rank 0's summary there, None on
    the other ranks. The callbacks are reported on rank 0 (`on_audio` never: the audio is decoded on every
    rank); no text-query graph is saved."""
    ctx = dist.init(request.device)
    try:
        co = _Coordinator(ctx)
        if ctx.is_main:
            return _lead(co, request, on_plan=on_plan, on_file=on_file)
        _follow(co, request)
        return None
    finally:
        dist.shutdown()


def _lead(co: _Coordinator, request: IndexRequest, on_plan, on_file):
    plans: list[indexer.Plan] = []

    def remember_plan(plan):
        plans.append(plan)
        if on_plan is not None:
            on_plan(plan)

    models: list[_ShardedModel] = []
    loader = ModelLoader(request)

    def load(name):
        models.append(_ShardedModel(loader(name), co, request.index_dir, plans))
        return models[-1]

    def merged():
        for model in models:
            model.merged()

    try:
        summary = indexer.build_index(request.roots, request.index_dir, load, **index_options(request),
                                      on_plan=remember_plan, on_file=on_file, on_committed=merged)
    except BaseException as exc:
        if not co.ordered:
            co.broadcast(("stop", _describe(exc)))
        elif co.stage in ("merging", "merged"):
            co.broadcast(_describe(exc))
        # "embedding"/"failed": the other ranks already know
        if co.stage == "merging" and not isinstance(exc, KeyboardInterrupt):
            raise ClapError(f"sharded indexing failed while merging: {_describe(exc)}; the batches committed "
                            f"so far stay in the index and the partitions are kept in "
                            f"{request.index_dir / PARTITIONS_DIR}: the same command run again merges the rest "
                            "without embedding it again") from exc
        raise
    co.broadcast(None if co.ordered else ("stop", None))
    return summary


def _follow(co: _Coordinator, request: IndexRequest) -> None:
    kind, payload = co.broadcast()
    if kind == "stop":
        if payload is not None:
            raise ClapError(f"rank 0 stopped: {payload}")
        return
    order: WorkOrder = payload

    def load():
        model = ModelLoader(request)(order.model_ref)
        if model.fingerprint != order.fingerprint:
            raise ClapError(f"{order.model_ref} loaded other weights here than on rank 0 "
                            f"({model.fingerprint}, not {order.fingerprint})")
        return model

    _embed_share(co, order, load, request.batch_size, request.workers)
    outcome = co.broadcast()
    if outcome is not None:
        raise ClapError(f"rank 0 failed to commit the merged partitions: {outcome}")
