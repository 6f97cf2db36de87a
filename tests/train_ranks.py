"""`clap ARGS` for torchrun that also writes each rank's parameters before and after training to
$CLAP_TEST_PARAMS/rank-R.pt (and rank-R-initial.pt), so a test can compare the ranks (tests/test_train_cli.py)."""

import os
from pathlib import Path

import torch

from clapcli.cli.main import main
from clapcli.train import loop

real_build_model, real_train = loop.build_model, loop.train
built = []
out = Path(os.environ["CLAP_TEST_PARAMS"])
rank = os.environ["RANK"]


def params(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def recording_build_model(*args, **kwargs):
    model, tokenizer, info = real_build_model(*args, **kwargs)
    built.append(model)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(params(model), out / f"rank-{rank}-initial.pt")
    return model, tokenizer, info


def recording_train(*args, **kwargs):
    summary = real_train(*args, **kwargs)
    torch.save(params(built[0]), out / f"rank-{rank}.pt")
    return summary


loop.build_model, loop.train = recording_build_model, recording_train
main()
