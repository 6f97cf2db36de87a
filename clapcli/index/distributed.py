"""`clap index` sharded over torchrun ranks: rank 0 plans and commits, every rank embeds a share.

    torchrun --nproc-per-node 4 -m clapcli index ~/samples
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m clapcli index /shared/samples --index /shared/indexes/sfx

The pattern is clip-retrieval's, on torch.distributed alone (no scheduler of our own):

1. Rank 0 runs the ordinary `indexer.build_index`: it alone takes the writer lock, scans, compares the scan
   with the store and loads the model. Its model is wrapped so that embedding the plan's files means:
2. rank 0 splits them into one share per rank (`share_by_size`: balanced in bytes, deterministic) and
   broadcasts the shares, the model's reference and fingerprint, and a run directory under
   `INDEX/.partitions/`;
3. every rank, rank 0 included, embeds its share with the same model (a rank that loads other weights
   fails) and writes a partition: `part-RRRRR.npy` (float32 vectors) and `part-RRRRR.json` (files, durations,
   errors, segments, rows), each atomically;
4. rank 0 gathers every rank's outcome, checks that it sees every partition, and broadcasts the verdict;
5. rank 0 merges the partitions in the scan's order through the single-process commit code, in ONE
   transaction, syncs the hnswlib file, and tells the other ranks, which exit 0 having written nothing to
   the store.

Any failure (a rank that cannot load the model, an exception while embedding, a partition rank 0 cannot
see, an error while committing) makes every rank exit non-zero with nothing committed, and the run's
partition files are deleted before any rank exits. A rank killed outright (SIGKILL, out of memory) makes
torchrun stop the others; its partitions are then cleared by the next run, under the lock.

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
import uuid
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch.distributed as torch_dist

from .. import dist
from ..api import AudioEmbedding, Segment
from ..atomic import atomic_write
from ..errors import ClapError
from . import indexer
from .schema import PARTITIONS_DIR

COORDINATION_TIMEOUT = timedelta(days=7)  # how long ranks wait for each other (a scan, the slowest share)


def launched(environ=None) -> bool:
    """True when this process is one of several started by torchrun (or srun): `clap index` then shards."""
    return dist.detect(environ).distributed


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


def partition_paths(directory: Path, rank: int) -> tuple[Path, Path]:
    """(vectors .npy, records .json) of one rank's partition; the .json is written last."""
    stem = directory / f"part-{rank:05d}"
    return stem.with_suffix(".npy"), stem.with_suffix(".json")


def write_partition(directory: Path, rank: int, results: Iterable[AudioEmbedding]) -> int:
    """Write one rank's results; returns how many files it holds. Each file's vectors are consecutive rows:
    the file embedding, then its windows in order."""
    records, vectors = [], []
    for result in results:
        record = {"path": result.path, "duration": result.duration, "error": result.error,
                  "error_kind": result.error_kind, "sample_rate": result.sample_rate, "channels": result.channels,
                  "partial": result.partial}
        if result.error is None:
            record["row"] = len(vectors)
            record["segments"] = [[s.start, s.end] for s in result.segments]
            vectors.append(np.asarray(result.embedding, dtype=np.float32))
            vectors.extend(np.asarray(s.embedding, dtype=np.float32) for s in result.segments)
        records.append(record)
    matrix = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)  # (rows, D)
    npy, meta = partition_paths(directory, rank)

    def save(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, matrix)

    atomic_write(npy, writer=save)
    atomic_write(meta, json.dumps({"rank": rank, "rows": len(vectors), "files": records}))
    return len(records)


def read_partition(directory: Path, rank: int) -> Iterator[AudioEmbedding]:
    """The results of one partition, in the order they were written (vectors memory-mapped)."""
    npy, meta = partition_paths(directory, rank)
    doc = json.loads(meta.read_text())
    vectors = np.load(npy, mmap_mode="r") if doc["rows"] else None  # (rows, D)
    for rec in doc["files"]:
        if rec["error"] is not None:
            yield AudioEmbedding(rec["path"], rec["duration"], None, error=rec["error"],
                                 sample_rate=rec["sample_rate"], channels=rec["channels"],
                                 error_kind=rec.get("error_kind"))
            continue
        row = rec["row"]
        segments = [Segment(start, end, np.array(vectors[row + 1 + k]))
                    for k, (start, end) in enumerate(rec["segments"])]
        yield AudioEmbedding(rec["path"], rec["duration"], np.array(vectors[row]), segments,
                             sample_rate=rec["sample_rate"], channels=rec["channels"], partial=rec.get("partial"))


# ---------------------------------------------------------------------------------------------------------
# Coordination


@dataclass(frozen=True)
class WorkOrder:
    """What rank 0 broadcasts once it knows what to embed."""

    model_ref: str  # how every rank loads the model
    fingerprint: str  # the weights every rank must have loaded
    paths: list[str]  # the files to embed, in the scan's order
    owner: list[int]  # the rank that embeds each of them
    directory: str  # where the partitions go


class _Coordinator:
    """The collectives of one sharded run, on a Gloo group of its own (objects only, long timeout)."""

    def __init__(self, ctx: dist.DistContext):
        self.ctx = ctx
        self.group = torch_dist.new_group(backend="gloo", timeout=COORDINATION_TIMEOUT)
        self.stage = "planning"  # rank 0: planning → embedding → merging, or failed

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

    Returns when every rank succeeded and rank 0 sees every partition; otherwise raises on every rank,
    once rank 0 has deleted the partitions."""
    rank, world = co.ctx.rank, co.ctx.world_size
    directory = Path(order.directory)
    mine = [path for path, owner in zip(order.paths, order.owner) if owner == rank]
    error: BaseException | None = None
    try:
        model = load()
        write_partition(directory, rank, model.embed_files(mine, batch_size=batch_size, segments=True,
                                                           workers=workers))
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, raised again below on every rank
        error = exc
    outcomes = co.gather(None if error is None else _describe(error))
    verdict = None
    if co.ctx.is_main:
        failed = [f"rank {r} of {world}: {why}" for r, why in enumerate(outcomes) if why is not None]
        unseen = [r for r in range(world) if not partition_paths(directory, r)[1].is_file()]
        if failed:
            verdict = "; ".join(failed)
        elif unseen:
            verdict = (f"rank 0 cannot see the partitions of rank {', '.join(map(str, unseen))} in {directory}: "
                       "with several nodes the index must be on a filesystem every node sees")
    verdict = co.broadcast(verdict)
    if verdict is None:
        return
    co.stage = "failed"
    if co.ctx.is_main:
        shutil.rmtree(directory, ignore_errors=True)
    co.barrier()  # the partitions are gone before any rank exits (torchrun stops the rest at the first exit)
    if isinstance(error, KeyboardInterrupt):
        raise error
    raise ClapError(f"sharded indexing failed, nothing was committed: {verdict}") from error


class _ShardedModel:
    """Rank 0's model as `indexer.build_index` sees it: `embed_files` shares the files among the ranks and
    returns every rank's results, which the indexer commits at once."""

    commit_at_once = True  # read by indexer._embed_and_commit

    def __init__(self, model, co: _Coordinator, index_dir: Path):
        self._model, self._co, self._index_dir = model, co, index_dir
        self.run_dir: Path | None = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def embed_files(self, paths, batch_size: int = 8, segments: bool = True, workers: int = 0):
        if self._co.stage != "planning" or not segments:
            raise RuntimeError("a sharded index run embeds its plan once, with segments")
        paths = [os.fspath(p) for p in paths]
        root = self._index_dir / PARTITIONS_DIR
        shutil.rmtree(root, ignore_errors=True)  # left by a run that was killed; this process holds the lock
        self.run_dir = root / uuid.uuid4().hex
        self.run_dir.mkdir(parents=True)
        order = WorkOrder(self._model.model_ref, self._model.fingerprint, paths,
                          share_by_size([_size(p) for p in paths], self._co.ctx.world_size), str(self.run_dir))
        self._co.stage = "embedding"
        self._co.broadcast(("work", order))
        _embed_share(self._co, order, lambda: self._model, batch_size, workers)
        self._co.stage = "merging"
        return _merged(order, self._co.ctx.world_size)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def _merged(order: WorkOrder, world_size: int) -> Iterator[AudioEmbedding]:
    """Every rank's results, in the scan's order (as one process would have produced them)."""
    directory = Path(order.directory)
    parts = [read_partition(directory, rank) for rank in range(world_size)]
    for path, rank in zip(order.paths, order.owner):
        result = next(parts[rank], None)
        if result is None or result.path != path:
            raise ClapError(f"the partition of rank {rank} in {directory} does not hold its share ({path})")
        yield result


# ---------------------------------------------------------------------------------------------------------
# Entry point


def build_index(roots: Sequence, index_dir: Path, load_model: Callable[[str | None], object], *,
                device: str | None = None, batch_size: int = 8, workers: int = 0,
                **options) -> indexer.IndexSummary | None:
    """`indexer.build_index` shared by the ranks of this job; joins (and leaves) the process group.

    Returns rank 0's summary there, None on the other ranks. `options` are `indexer.build_index`'s."""
    ctx = dist.init(device)
    try:
        co = _Coordinator(ctx)
        if ctx.is_main:
            return _lead(co, roots, Path(index_dir), load_model, batch_size, workers, options)
        _follow(co, load_model, batch_size, workers)
        return None
    finally:
        dist.shutdown()


def _lead(co: _Coordinator, roots, index_dir: Path, load_model, batch_size, workers, options):
    models: list[_ShardedModel] = []

    def load(name):
        models.append(_ShardedModel(load_model(name), co, index_dir))
        return models[-1]

    try:
        summary = indexer.build_index(roots, index_dir, load, batch_size=batch_size, workers=workers, **options)
    except BaseException as exc:
        if co.stage == "planning":
            co.broadcast(("stop", _describe(exc)))
        elif co.stage == "merging":
            co.broadcast(_describe(exc))
        raise  # "embedding"/"failed": the other ranks already know
    else:
        if co.stage == "planning":
            co.broadcast(("stop", None))  # nothing to embed
        else:
            co.broadcast(None)
        return summary
    finally:
        for model in models:
            if model.run_dir is not None:
                shutil.rmtree(model.run_dir, ignore_errors=True)
                try:
                    model.run_dir.parent.rmdir()
                except OSError:
                    pass  # another run's partitions, or already gone


def _follow(co: _Coordinator, load_model, batch_size, workers) -> None:
    kind, payload = co.broadcast()
    if kind == "stop":
        if payload is not None:
            raise ClapError(f"rank 0 stopped before embedding: {payload}")
        return
    order: WorkOrder = payload

    def load():
        model = load_model(order.model_ref)
        if model.fingerprint != order.fingerprint:
            raise ClapError(f"{order.model_ref} loaded other weights here than on rank 0 "
                            f"({model.fingerprint}, not {order.fingerprint})")
        return model

    _embed_share(co, order, load, batch_size, workers)
    outcome = co.broadcast()
    if outcome is not None:
        raise ClapError(f"rank 0 failed to commit the merged partitions: {outcome}")
