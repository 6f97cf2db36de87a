"""`clap finetune --full` on `clap train`'s machinery, with the tiny random fused model on the four synthesised
sound kinds: the loss falls and held-out clips are classified above chance; the run directory holds the run
log and step checkpoints; a run resumed from its step checkpoint equals a straight run; two torchrun ranks
equal one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import clap
from entry_point import clap_executable
from test_errors import run_main
from test_finetune import class_folders
from train_data import KINDS


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def step_losses(run: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run may log a step again)."""
    return {r["step"]: r["loss"] for r in log_records(run) if "loss" in r}


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_classifier(a: Path, b: Path, atol: float = 1e-6) -> None:
    for name in ("head.safetensors", "model/model.safetensors"):
        left, right = tensors(a / name), tensors(b / name)
        assert left.keys() == right.keys()
        for key in left:
            torch.testing.assert_close(right[key], left[key], atol=atol, rtol=1e-5, msg=f"{name}: {key}")


def full_args(data: Path, model: Path, out: Path, *extra) -> list:
    return ["finetune", "--data", data, "--model", model, "--out", out, "--full", "--device", "cpu", *extra]


def test_full_finetune_loss_falls_and_classifies_held_out_clips(tmp_path, tiny_model_dir):
    """Encoder and head trained together: the training loss falls, and `clap tag --classifier` labels clips
    no split saw far more often than chance (0.25); the run log has every step and every epoch."""
    class_folders(tmp_path / "train", per_kind=5, seed=0)  # 4 per kind train, 1 validates
    held_out = class_folders(tmp_path / "held", per_kind=3, seed=99)
    result = clap(*full_args(tmp_path / "train", tiny_model_dir, tmp_path / "clf", "--epochs", "8", "--batch-size",
                             "8", "--lr", "1e-2", "--encoder-lr", "1e-3", "--warmup", "2", "--json"))
    epochs = [json.loads(line) for line in result.stdout.splitlines()][:-1]
    assert [e["epoch"] for e in epochs] == list(range(1, 9))
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    rows = [json.loads(line) for line in clap("tag", *[f for f, _ in held_out], "--classifier", tmp_path / "clf",
                                              "--json", "--top", "1").stdout.splitlines()]
    correct = np.mean([r["labels"][0]["label"] == kind for r, (_, kind) in zip(rows, held_out)])
    assert correct >= 0.5, correct

    run = tmp_path / "clf.run"  # the default run directory, beside the classifier
    records = log_records(run)
    assert records[0]["event"] == "start" and records[0]["steps_per_epoch"] == 2 and records[-1]["event"] == "done"
    assert sorted(step_losses(run)) == list(range(1, 17))
    lrs = [r["lr"] for r in records if "loss" in r]
    assert lrs[0] == pytest.approx(1e-2 / 2) and lrs[1] == pytest.approx(1e-2) and lrs[-1] < lrs[2]  # warm-up, decay
    assert [r["epoch"] for r in records if "val_loss" in r] == list(range(1, 9))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-14", "step-16"]
    assert (run / "best" / "model.safetensors").is_file() and json.loads((run / "config.json").read_text())[
        "finetune"]["full"] is True
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["metrics"]["best_epoch"] == min(epochs, key=lambda e: (-e["val_top1"], e["val_loss"]))["epoch"]
    assert "step" not in meta["metrics"]["history"][0] and len(meta["metrics"]["history"]) == 8


def test_full_finetune_resumed_from_its_step_checkpoint_equals_a_straight_run(tmp_path, tiny_model_dir):
    """Stopped after one epoch (--max-steps) and resumed, with mixup drawing every step: the same step losses,
    the same head and encoder as one straight run of three epochs."""
    class_folders(tmp_path / "data", per_kind=5, seed=2)
    opts = ["--epochs", "3", "--batch-size", "8", "--lr", "1e-2", "--encoder-lr", "1e-3", "--warmup", "1",
            "--mixup", "0.4"]
    clap(*full_args(tmp_path / "data", tiny_model_dir, tmp_path / "straight", *opts))
    clap(*full_args(tmp_path / "data", tiny_model_dir, tmp_path / "resumed", *opts, "--max-steps", "2"))
    run = tmp_path / "resumed.run"
    assert sorted(step_losses(run)) == [1, 2] and (run / "step-2" / "trainer_state.pt").is_file()
    clap(*full_args(tmp_path / "data", tiny_model_dir, tmp_path / "resumed", *opts, "--resume", "--overwrite"))
    assert [r["step"] for r in log_records(run) if r.get("event") == "resumed"] == [2]
    straight = step_losses(tmp_path / "straight.run")
    resumed = step_losses(run)
    assert sorted(straight) == sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([straight[s] for s in sorted(straight)], rel=1e-5)
    assert_same_classifier(tmp_path / "straight", tmp_path / "resumed")
    history = [json.loads((tmp_path / d / "classifier.json").read_text())["metrics"]["history"]
               for d in ("straight", "resumed")]
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in history]
    assert strip[0] == strip[1]


def test_full_finetune_run_directory_refusals(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A run directory holding a run is continued with --resume, started again with --overwrite, else refused;
    a resume with other options is refused; the machinery's options need --full."""
    class_folders(tmp_path / "data", per_kind=2, seed=4)
    base = ["--epochs", "1", "--batch-size", "4"]
    code, err = run_main(monkeypatch, capsys, "finetune", "--data", tmp_path / "data", "--model", tiny_model_dir,
                         "--out", tmp_path / "frozen", "--resume", "--warmup", "3")
    assert code == 2 and "--warmup, --resume are for --full" in err and not (tmp_path / "frozen").exists()

    run = tmp_path / "my-run"
    args = full_args(tmp_path / "data", tiny_model_dir, tmp_path / "clf", *base, "--run-dir", run)
    clap(*args)
    assert (run / "log.jsonl").is_file() and not (tmp_path / "clf.run").exists()
    code, err = run_main(monkeypatch, capsys, *args[:-2], "--out", tmp_path / "other", "--run-dir", run)
    assert code == 2 and "holds a finetune run" in err and "--resume" in err and err.count("\n") == 1
    code, err = run_main(monkeypatch, capsys, *args, "--lr", "5e-3", "--resume", "--overwrite")
    assert code == 2 and "differs in: lr" in err
    code, err = run_main(monkeypatch, capsys, *args, "--overwrite")  # a fresh run replaces the old one
    assert code == 0, err
    assert [r.get("event") for r in log_records(run)].count("start") == 1


def test_torchrun_two_ranks_equal_one_rank(tmp_path, tiny_model_dir):
    """Two Gloo ranks, each on half of every batch: DDP's gradient average is the gradient of the whole
    batch's mean loss (BatchNorm runs as loaded), so the classifier equals a one-process run's; rank 0 alone
    writes the run log and the classifier. Equal within 1e-4, while training moved the encoder by ~1e-3 a
    step: Adam scales a parameter's update by its gradient's size, so where the gradient is ~0 (attention key
    biases) the rounding of a sum in another order shows."""
    class_folders(tmp_path / "data", per_kind=5, seed=6)
    opts = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--encoder-lr", "1e-3"]
    clap(*full_args(tmp_path / "data", tiny_model_dir, tmp_path / "one", *opts))
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "--no-python", clap_executable(),
                           *map(str, full_args(tmp_path / "data", tiny_model_dir, tmp_path / "two", *opts))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = log_records(tmp_path / "two.run")
    assert records[0]["world_size"] == 2 and [r.get("event") for r in records].count("start") == 1
    assert step_losses(tmp_path / "two.run") == pytest.approx(step_losses(tmp_path / "one.run"), rel=1e-5)
    assert_same_classifier(tmp_path / "one", tmp_path / "two", atol=1e-4)
    from clapcli import load_model

    base = load_model(tiny_model_dir, device="cpu").model.state_dict()
    tuned = tensors(tmp_path / "two" / "model" / "model.safetensors")
    assert max(float((tuned[k] - base[k]).abs().max()) for k in tuned if k.startswith("audio_")) > 1e-3
    assert proc.stdout.count("wrote ") == 1  # one summary, from rank 0
