"""The distributed context: the one module that reads the launcher's environment.

Two launchers are understood:

- `torchrun` (and `python -m torch.distributed.run`) sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT for every process; the process group then rendezvouses through `env://`, which also reuses the
  store torchrun's agent already serves.
- SLURM's `srun` without torchrun sets SLURM_STEP_ID (the job step), SLURM_PROCID (global rank),
  SLURM_LOCALID (rank on the node) and SLURM_STEP_NUM_TASKS / SLURM_NTASKS (world size) per task. SLURM
  names no rendezvous host, so the job script exports MASTER_ADDR (e.g. the first host of `scontrol show
  hostnames "$SLURM_JOB_NODELIST"`) and optionally MASTER_PORT (default 29500, torchrun's). An `sbatch
  --ntasks=N` script run without `srun` also carries SLURM_PROCID=0 and SLURM_NTASKS=N but is one process
  (the batch step, no SLURM_STEP_ID of a real step): it runs as a single process, with a warning saying to
  start the command with `srun` for N processes, instead of waiting forever for N-1 peers that never come.

torchrun's variables win when both are present (torchrun inside a SLURM allocation). With neither, the
process is alone: rank 0 of a world of 1, and every collective below is a no-op, so single-process code
needs no branches.

Nothing else in the package reads these variables (tests/test_floors.py checks it); training and sharded
embedding take a `DistContext`, and `launched()` answers whether a command runs as one of several processes.
torch is imported by the functions that use it, so `launched()` costs a command that runs alone nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from .errors import ClapError, UsageError

DEFAULT_MASTER_PORT = 29500  # torchrun's default rendezvous port
SLURM_PSEUDO_STEPS = 0xFFFFFFF0  # step ids from here up are SLURM's batch/extern/interactive steps, not srun's
MAIN_WORK_TIMEOUT = timedelta(hours=24)  # how long the other ranks wait for rank 0's validation and saving
_main_work_group = None  # the Gloo group of those waits, opened by `init`

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) job."""

    rank: int  # global rank, 0 … world_size-1
    local_rank: int  # rank on this node; picks the GPU
    world_size: int  # number of processes in the job
    backend: str  # "nccl" (CUDA) or "gloo" (CPU); the backend a process group uses or would use
    device: torch.device  # this process's device: cuda:<local_rank> or cpu
    launcher: str = "single"  # "torchrun", "slurm" or "single": which environment the values came from

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, saves checkpoints and writes the index."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    try:
        return int(value)
    except ValueError:
        raise ClapError(f"environment variable {name}={value!r} is not an integer") from None


def _launcher_values(environ: Mapping[str, str]) -> tuple[str, int, int, int]:
    """(launcher, rank, local_rank, world_size) from the environment, validated."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        launcher = "torchrun"
        rank, world_size = _env_int(environ, "RANK"), _env_int(environ, "WORLD_SIZE")
        # torchrun always sets LOCAL_RANK; a hand-made multi-process launch on one node may not.
        local_rank = _env_int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        if not _in_srun_step(environ):
            if _env_int(environ, "SLURM_NTASKS") > 1:
                log.warning("SLURM_NTASKS=%s but this is the batch script, not an srun step: running as one "
                            "process (start the command with `srun` to run %s)", environ["SLURM_NTASKS"],
                            environ["SLURM_NTASKS"])
            return "single", 0, 0, 1
        launcher = "slurm"
        size_name = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
        rank, world_size = _env_int(environ, "SLURM_PROCID"), _env_int(environ, size_name)
        local_rank = _env_int(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else rank
    else:
        return "single", 0, 0, 1
    if world_size < 1 or not 0 <= rank < world_size or not 0 <= local_rank <= rank:
        raise ClapError(
            f"inconsistent {launcher} environment: rank {rank}, local rank {local_rank}, world size {world_size}"
        )
    if world_size == 1:
        launcher = "single"
    return launcher, rank, local_rank, world_size


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """Whether this process is a task of an `srun` job step (SLURM_STEP_ID, SLURM_STEPID before Slurm 20),
    not the batch script of `sbatch`, which also carries SLURM_PROCID and SLURM_NTASKS."""
    name = "SLURM_STEP_ID" if "SLURM_STEP_ID" in environ else "SLURM_STEPID"
    if name not in environ:
        return False
    return _env_int(environ, name) < SLURM_PSEUDO_STEPS


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process is one of several started by torchrun (or an srun step of several tasks), as the
    environment (`os.environ` unless given) says; reads only, imports no torch."""
    return _launcher_values(os.environ if environ is None else environ)[3] > 1


def _default_device(local_rank: int) -> torch.device:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def detect(environ: Mapping[str, str] | None = None) -> DistContext:
    """The context the environment describes (`os.environ` unless given), with the default device.

    Reads only; starts nothing. The device is cuda:<local_rank> (modulo the GPUs this node sees) where CUDA
    is available, else the CPU; `init` resolves an explicit device request.
    """
    environ = os.environ if environ is None else environ
    launcher, rank, local_rank, world_size = _launcher_values(environ)
    device = _default_device(local_rank)
    return DistContext(rank, local_rank, world_size, _backend_for(device), device, launcher)


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _resolve_device(request: str | None, local_rank: int, world_size: int) -> torch.device:
    import torch

    from .runtime import resolve_device

    device = resolve_device(request)  # auto → cuda when torch sees a GPU; unknown names fail there
    if device.type != "cuda":
        if world_size > 1 and device.type != "cpu":
            raise UsageError(f"--device {request} cannot train across processes; use cpu or cuda")
        return device
    if world_size == 1:
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    # One process per GPU: the launcher's LOCAL_RANK is the only index that cannot collide.
    if device.index is not None and device.index != local_rank:
        raise UsageError(
            f"--device {request} under a {world_size}-process launch: each process uses the GPU of its local "
            "rank; pass --device cuda (and choose GPUs with CUDA_VISIBLE_DEVICES)"
        )
    if local_rank >= torch.cuda.device_count():
        raise ClapError(
            f"local rank {local_rank} has no GPU: this node sees {torch.cuda.device_count()}; "
            "start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


def init(device_request: str | None = None, environ: Mapping[str, str] | None = None,
         timeout: timedelta | None = None) -> DistContext:
    """Resolve this process's device and, in a multi-process job, join the process group.

    `device_request` is "auto" (None), "cpu", "cuda" or "cuda:N". With more than one process: NCCL on CUDA
    (each process on the GPU of its local rank), Gloo on the CPU. `timeout` bounds the process group's
    collectives (None: torch's default, 10 minutes on NCCL); waits for rank 0's own work use a second, Gloo
    group with `MAIN_WORK_TIMEOUT` (see `barrier`). Calling it again returns the same context without
    initialising twice.
    """
    import torch
    import torch.distributed as torch_dist

    environ = os.environ if environ is None else environ
    launcher, rank, local_rank, world_size = _launcher_values(environ)
    device = _resolve_device(device_request, local_rank, world_size)
    ctx = DistContext(rank, local_rank, world_size, _backend_for(device), device, launcher)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return ctx
    if torch_dist.is_initialized():
        have = (torch_dist.get_rank(), torch_dist.get_world_size(), torch_dist.get_backend())
        if have != (rank, world_size, ctx.backend):
            raise ClapError(
                f"a process group is already running as rank {have[0]} of {have[1]} ({have[2]}), "
                f"not rank {rank} of {world_size} ({ctx.backend})"
            )
        _open_main_work_group()
        return ctx
    options = {} if timeout is None else {"timeout": timeout}
    if launcher == "torchrun":
        torch_dist.init_process_group(backend=ctx.backend, init_method="env://", rank=rank, world_size=world_size,
                                      **options)
    else:
        if "MASTER_ADDR" not in environ:
            raise ClapError(
                "a SLURM launch of several tasks needs MASTER_ADDR (and optionally MASTER_PORT) exported: "
                'e.g. export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
            )
        host = environ["MASTER_ADDR"]
        port = _env_int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else DEFAULT_MASTER_PORT
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host  # IPv6 literal
        torch_dist.init_process_group(
            backend=ctx.backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=world_size, **options
        )
    _open_main_work_group()
    return ctx


def _open_main_work_group() -> None:
    """The Gloo group of `barrier(main_work=True)` (collective: every rank calls it, once)."""
    import torch.distributed as torch_dist

    global _main_work_group
    if _main_work_group is None:
        _main_work_group = torch_dist.new_group(backend="gloo", timeout=MAIN_WORK_TIMEOUT)


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as torch_dist

    global _main_work_group
    if torch_dist.is_available() and torch_dist.is_initialized():
        _main_work_group = None
        torch_dist.destroy_process_group()


def _world_size() -> int:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_world_size()
    return 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) of every rank in rank order → (world*B, ...), differentiably.

    Every rank must pass the same shape. Backward: each rank's slice receives the SUM over all ranks of the
    gradient that reached that slice (torch.distributed.nn's all_gather: a reduce-scatter on NCCL, scatters
    on Gloo). `clapcli.train.loss` explains why this, with DDP's gradient averaging, reproduces one-process
    training exactly.
    """
    import torch

    if _world_size() == 1:
        return x
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(x), dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (B, ...) of every rank in rank order → (world*B, ...), detached from autograd."""
    import torch
    import torch.distributed as torch_dist

    if _world_size() == 1:
        return x.detach()
    x = x.detach().contiguous()
    parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def barrier(main_work: bool = False) -> None:
    """Wait until every rank arrives here.

    `main_work=True` where the others wait while rank 0 alone works (validates, saves a checkpoint on a
    slow filesystem): on a Gloo group with `MAIN_WORK_TIMEOUT`, so that work is not cut short by the
    collectives' timeout (NCCL's default 10 minutes would abort every rank)."""
    import torch
    import torch.distributed as torch_dist

    if _world_size() == 1:
        return
    if main_work and _main_work_group is not None:
        torch_dist.barrier(group=_main_work_group)
    elif torch_dist.get_backend() == "nccl":
        torch_dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch_dist.barrier()


def broadcast_object(obj: Any, src: int = 0, main_work: bool = False) -> Any:
    """`obj` of rank `src` on every rank (picklable objects: a file list, a run directory name, a seed);
    `main_work` as for `barrier`, when rank `src` may take long to produce it."""
    import torch.distributed as torch_dist

    if _world_size() == 1:
        return obj
    box = [obj]
    if main_work and _main_work_group is not None:
        torch_dist.broadcast_object_list(box, src=src, group=_main_work_group)
    else:
        torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks as a new floating tensor (integers become float64); no gradient."""
    import torch.distributed as torch_dist

    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.double()
    if _world_size() == 1:
        return out
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / torch_dist.get_world_size()
