"""The contrastive loss against a hand computation, the distributed context from launcher environments, and two
Gloo processes under DDP reproducing one-process training on the concatenated batch."""

from __future__ import annotations

import math
import os
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clapcli import dist
from clapcli.errors import ClapError
from clapcli.train.loss import MAX_LOGIT_SCALE, ClipLoss, clamp_logit_scale_

# --- the loss on one process ----------------------------------------------------------------------------------


def _hand_loss(a: torch.Tensor, t: torch.Tensor, scale: float) -> float:
    """Symmetric cross-entropy written out with loops: row i of each direction should pick column i."""
    n = a.shape[0]
    sim = [[scale * sum(float(a[i, k]) * float(t[j, k]) for k in range(a.shape[1])) for j in range(n)] for i in range(n)]
    audio_ce = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(n))) for i in range(n)) / n
    text_ce = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(n))) for j in range(n)) / n
    return (audio_ce + text_ce) / 2


def test_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(5, 3, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = ClipLoss()(a, t, scale)
    assert got.ndim == 0
    assert float(got) == pytest.approx(_hand_loss(a, t, float(scale)), rel=1e-12)
    # Not symmetric in its arguments by accident: swapping towers changes only the order of the two terms.
    assert float(ClipLoss()(t, a, scale)) == pytest.approx(float(got), rel=1e-12)
    # Matching pairs scored high give a lower loss than the same embeddings mispaired.
    assert float(ClipLoss()(a, a, scale)) < float(ClipLoss()(a, a.roll(1, dims=0), scale))


def test_loss_uses_the_logit_scale_as_a_multiplier():
    g = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=-1)
    for scale in (1.0, 7.5, 100.0):
        assert float(ClipLoss()(a, t, torch.tensor(scale, dtype=torch.float64))) == pytest.approx(
            _hand_loss(a, t, scale), rel=1e-12
        )


def test_loss_rejects_mismatched_shapes_and_bad_ranks():
    with pytest.raises(ValueError):
        ClipLoss()(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError):
        ClipLoss(rank=2, world_size=2)


def test_clamp_logit_scale_clamps_the_raw_parameter_in_place():
    for raw, expected in ((6.0, math.log(100)), (-0.5, 0.0), (2.6593, 2.6593)):
        p = nn.Parameter(torch.tensor(raw))
        out = clamp_logit_scale_(p)
        assert out is p and p.requires_grad
        assert float(p.detach()) == pytest.approx(expected, abs=1e-6)
    assert MAX_LOGIT_SCALE == pytest.approx(4.605170, abs=1e-6)


# --- the distributed context ----------------------------------------------------------------------------------


def test_detect_without_launcher_is_a_single_process():
    ctx = dist.detect({})
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.launcher) == (0, 0, 1, "single")
    assert ctx.is_main and not ctx.distributed


def test_detect_torchrun_environment():
    env = {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
    ctx = dist.detect(env)
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.launcher) == (5, 1, 8, "torchrun")
    assert ctx.distributed and not ctx.is_main
    assert ctx.backend == ("nccl" if ctx.device.type == "cuda" else "gloo")


def test_detect_slurm_environment_and_torchrun_precedence():
    slurm = {"SLURM_PROCID": "3", "SLURM_LOCALID": "3", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0"}
    ctx = dist.detect(slurm)
    assert (ctx.rank, ctx.local_rank, ctx.world_size, ctx.launcher) == (3, 3, 4, "slurm")
    # torchrun inside a SLURM allocation: torchrun's variables describe the processes.
    both = {**slurm, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert (dist.detect(both).world_size, dist.detect(both).launcher) == (2, "torchrun")
    # A one-task SLURM job is a plain single process.
    one = dist.detect({"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert (one.world_size, one.launcher) == (1, "single")
    # `srun -n 2` inside a larger allocation: the step's task count is the world.
    step = dist.detect({**slurm, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "2"})
    assert (step.rank, step.world_size) == (1, 2)


@pytest.mark.parametrize("step", [None, "4294967291", "4294967292"])  # none, the batch step, the extern step
def test_an_sbatch_script_without_srun_is_one_process_with_a_warning(step, caplog):
    """`sbatch --ntasks=4` sets SLURM_NTASKS=4 and SLURM_PROCID=0 in the batch script itself; a `clap index`
    run there directly is one process, not rank 0 of 4 waiting forever for three peers."""
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77",
           "SLURM_NNODES": "1"}
    if step is not None:
        env["SLURM_STEP_ID"] = step
    with caplog.at_level("WARNING", logger="clapcli.dist"):
        ctx = dist.detect(env)
        assert dist.init("cpu", environ=env).world_size == 1  # joins no process group
    assert (ctx.rank, ctx.world_size, ctx.launcher, ctx.distributed) == (0, 1, "single", False)
    assert not torch.distributed.is_initialized()
    assert "srun" in caplog.text
    assert not dist.launched(env)  # `clap index` runs as a single process


def test_detect_reads_os_environ(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert dist.detect().world_size == 1
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert (dist.detect().rank, dist.detect().world_size) == (1, 3)


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"RANK": "1", "LOCAL_RANK": "2", "WORLD_SIZE": "4"},
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "0", "SLURM_STEP_ID": "0"},
    ],
)
def test_detect_rejects_inconsistent_environments(env):
    with pytest.raises(ClapError):
        dist.detect(env)


def test_slurm_launch_without_master_addr_says_what_to_export():
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}
    with pytest.raises(ClapError, match="MASTER_ADDR"):
        dist.init("cpu", environ=env)
    assert not torch.distributed.is_initialized()


def test_single_process_init_and_collectives_are_no_ops():
    ctx = dist.init("cpu", environ={})
    assert (ctx.world_size, ctx.device, ctx.backend) == (1, torch.device("cpu"), "gloo")
    assert not torch.distributed.is_initialized()
    x = torch.randn(3, 2, requires_grad=True)
    assert dist.all_gather_with_grad(x) is x
    gathered = dist.all_gather_no_grad(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad
    mean = dist.all_reduce_mean(torch.tensor([1, 2]))
    assert mean.dtype == torch.float64 and mean.tolist() == [1.0, 2.0]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()
    dist.shutdown()


# --- two Gloo processes under DDP equal one process on the concatenated batch -----------------------------------

WORLD = 2
PER_RANK = 3
MODES = {  # name: (local_loss, gather_with_grad)
    "full": (False, True),
    "local": (True, True),
    "full_nograd": (False, False),
    "local_nograd": (True, False),
}


class _Towers(nn.Module):
    """Two linear towers and a learnable logit scale: the shape of ClapModel's training surface."""

    def __init__(self):
        super().__init__()
        self.audio = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, audio_in, text_in):
        return F.normalize(self.audio(audio_in), dim=-1), F.normalize(self.text(text_in), dim=-1), self.logit_scale.exp()


def _fixture_data():
    torch.manual_seed(0)
    model = _Towers().double()
    g = torch.Generator().manual_seed(1)
    return {
        "state": model.state_dict(),
        "audio_in": torch.randn(WORLD * PER_RANK, 6, generator=g, dtype=torch.float64),
        "text_in": torch.randn(WORLD * PER_RANK, 5, generator=g, dtype=torch.float64),
    }


def _rank_worker(rank: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    for name in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"):
        os.environ.pop(name, None)
    torch.set_num_threads(1)
    ctx = dist.init("cpu")
    assert dist.init("cpu") == ctx  # idempotent: the second call joins nothing new
    data = torch.load(data_path, weights_only=True)
    results = {"ctx": (ctx.rank, ctx.world_size, ctx.backend, ctx.launcher)}
    for name, (local_loss, with_grad) in MODES.items():
        model = _Towers().double()
        model.load_state_dict(data["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        audio, text, scale = ddp(data["audio_in"][mine], data["text_in"][mine])
        loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD)(
            audio, text, scale
        )
        loss.backward()
        results[name] = {
            "loss": loss.detach(),
            "mean_loss": dist.all_reduce_mean(loss),
            "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()},
        }
    x = torch.full((2, 3), float(rank), requires_grad=True)
    gathered = dist.all_gather_with_grad(x)  # (4, 3)
    (gathered * torch.arange(1.0, 5.0)[:, None]).sum().backward()
    results["gather"] = gathered.detach()
    results["gather_grad"] = x.grad.clone()
    results["broadcast"] = dist.broadcast_object({"from": rank})
    dist.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run `_rank_worker` on 2 Gloo processes once; return (data, per-rank results)."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    data = _fixture_data()
    torch.save(data, tmp / "data.pt")
    procs = mp.start_processes(
        _rank_worker, args=(_free_port(), str(tmp / "data.pt"), str(tmp)), nprocs=WORLD, join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 240
    try:
        while not procs.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the two Gloo ranks did not finish within 240 s (a collective hung)")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    return data, [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(data):
    """Loss and parameter gradients of one process on the whole (concatenated) batch."""
    model = _Towers().double()
    model.load_state_dict(data["state"])
    loss = ClipLoss()(*model(data["audio_in"], data["text_in"]))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_two_ranks_joined_through_torchrun_variables(two_ranks):
    _, results = two_ranks
    assert [r["ctx"] for r in results] == [(0, 2, "gloo", "torchrun"), (1, 2, "gloo", "torchrun")]
    for r in results:
        assert r["gather"][:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]  # rank order
        assert r["broadcast"] == {"from": 0}
    # The gathered rows were weighted 1, 2 (rank 0's) and 3, 4 (rank 1's) on EVERY rank: each rank's input
    # receives the sum over the two ranks of the gradient its own rows got, twice its local share.
    assert results[0]["gather_grad"][:, 0].tolist() == [2.0, 4.0]
    assert results[1]["gather_grad"][:, 0].tolist() == [6.0, 8.0]


@pytest.mark.parametrize("mode", ["full", "local"])
def test_gather_with_grad_under_ddp_equals_one_process(two_ranks, mode):
    data, results = two_ranks
    loss, grads = _single_process(data)
    for r in results:
        got = r[mode]
        assert _close(got["mean_loss"], loss)
        for name, expected in grads.items():
            assert _close(got["grads"][name], expected), (mode, name, got["grads"][name], expected)
    if mode == "full":
        assert all(_close(r[mode]["loss"], loss) for r in results)  # every rank computes the global loss
    else:
        # Each rank's loss is its own rows' share; only their mean is the global loss.
        assert not _close(results[0][mode]["loss"], results[1][mode]["loss"])


def test_gather_without_grad_does_not_reproduce_one_process(two_ranks):
    """LAION's gather_with_grad=False: only the rank's own slice carries gradient. In full mode the tower
    gradients come out exactly 1/W of the one-process ones (the logit scale's is unaffected); in local mode the
    cross-rank terms are lost altogether."""
    data, results = two_ranks
    loss, grads = _single_process(data)
    full = results[0]["full_nograd"]
    assert _close(full["loss"], loss)
    for name, expected in grads.items():
        if name == "logit_scale":
            assert _close(full["grads"][name], expected)
        else:
            assert not _close(full["grads"][name], expected)
            assert _close(full["grads"][name], expected / WORLD)
    local = results[0]["local_nograd"]
    assert _close(local["mean_loss"], loss)
    for name in ("audio.weight", "text.weight"):
        assert not _close(local["grads"][name], grads[name])
        assert not _close(local["grads"][name], grads[name] / WORLD)
