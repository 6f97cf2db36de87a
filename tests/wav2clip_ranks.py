"""Two Gloo ranks for tests/test_wav2clip_train.py, in a module of light imports: the spawned processes import
only this (not the CLI the test module pulls in)."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from clapcli import dist
from clapcli.train.objective import Wav2ClipLoss, Wav2ClipObjective, Wav2ClipOutput


class ToyTrainee(torch.nn.Module):
    """The Wav2ClipTrainee's training surface on linear layers: encoder (W = 5), audio head (D = 4), image head."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(6, 5)
        self.audio_head = torch.nn.Linear(5, 4)
        self.objective = Wav2ClipObjective(4, 5)

    def forward(self, audio_in, images):
        a = self.encoder(audio_in)
        return Wav2ClipOutput(F.normalize(a, dim=-1), F.normalize(self.audio_head(a), dim=-1),
                              F.normalize(images, dim=-1), F.normalize(self.objective.image_head(images), dim=-1),
                              self.objective.logit_scale_ai.exp(), self.objective.logit_scale_pi.exp())


def toy_data():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return {"state": ToyTrainee().double().state_dict(), "audio": torch.randn(6, 6, generator=g, dtype=torch.float64),
            "images": torch.randn(6, 4, generator=g, dtype=torch.float64)}


def toy_rank(rank: int, port: int, data_path: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init("cpu")
    data = torch.load(data_path, weights_only=True)
    results = {}
    for local in (False, True):
        model = ToyTrainee().double()
        model.load_state_dict(data["state"])
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        mine = slice(rank * 3, rank * 3 + 3)
        loss = Wav2ClipLoss(local_loss=local, rank=rank, world_size=2)(ddp(data["audio"][mine], data["images"][mine]))
        loss.backward()
        results[local] = {"loss": dist.all_reduce_mean(loss.detach()),
                          "grads": {n: p.grad.detach().clone() for n, p in model.named_parameters()}}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.shutdown()
