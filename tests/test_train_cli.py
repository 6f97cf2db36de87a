"""`clap train` end to end through the CLI: it learns, it resumes exactly after a SIGKILL, it adapts released
checkpoints, it freezes what it is told to, it refuses what it should."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import clap
from entry_point import clap_executable
from clapcli.data.shard_writer import ShardWriter, encode_flac
from test_errors import run_main
from train_data import CAPTIONS, KINDS, SR, clip, kind_of, make_dataset, make_tokenizer

def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def step_records(run: Path) -> dict[int, dict]:
    """The last record of every step (a resumed run logs again the steps it redoes)."""
    return {r["step"]: r for r in log_records(run) if "loss" in r}


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Shards of the four-kind toy set (train + val) and its tokenizer."""
    root = tmp_path_factory.mktemp("toy")
    manifest = make_dataset(root, per_kind=16)
    make_tokenizer(root / "tok")
    clap("shards", "make", manifest, "--out", root / "shards", "--val-fraction", "0.2", "--shard-size", "16",
         "--seed", "1")
    files, kinds = held_out_clips(root, per_kind=3, seed=777)  # class folders named by a caption of the kind
    for f, kind in zip(files, kinds):
        (root / "labelled" / CAPTIONS[kind][0]).mkdir(parents=True, exist_ok=True)
        f.rename(root / "labelled" / CAPTIONS[kind][0] / f.name)
    return root


TRAIN = ["--model-config", "tiny", "--workers", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "learn"
    clap("train", "--data", toy / "shards", "--tokenizer", toy / "tok", "--out", run, *TRAIN,
         "--epochs", "10", "--batch-size", "16", "--lr", "1e-3", "--warmup", "3", "--seed", "0",
         "--val-zeroshot", toy / "labelled", "--template", "{}")
    return run


def test_training_learns_the_sound_kinds(trained, tmp_path):
    """New clips, never in any shard, are matched to the caption of their kind far above chance (0.25)."""
    from clapcli import load_model

    records = log_records(trained)
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    val = [r["val"] for r in records if "val" in r]
    assert len(val) == 10 and val[-1]["t2a_mAP@10"] > val[0]["t2a_mAP@10"], val
    assert val[-1]["zeroshot_top1"] >= 0.5, val  # 12 labelled clips, 4 classes: chance is 0.25

    model = load_model(trained / "final", device="cpu")
    files, kinds = held_out_clips(tmp_path, per_kind=6)
    audio = model.embed_audio(files)
    prompts = np.stack([model.embed_text(CAPTIONS[k]).mean(0) for k in KINDS])  # a prompt ensemble per kind
    predicted = [KINDS[i] for i in (audio @ prompts.T).argmax(1)]
    accuracy = np.mean([p == k for p, k in zip(predicted, kinds)])
    assert accuracy >= 0.6, (accuracy, predicted)


def held_out_clips(directory: Path, per_kind: int, seed: int = 12345) -> tuple[list[Path], list[str]]:
    import soundfile as sf

    rng = np.random.default_rng(seed)  # not the training set's seed
    files, kinds = [], []
    for i in range(per_kind):
        for kind in KINDS:
            files.append(directory / f"held-{kind}-{i}.wav")
            sf.write(files[-1], clip(kind, rng), SR)
            kinds.append(kind)
    return files, kinds


def test_trained_checkpoint_indexes_and_searches(toy, trained, tmp_path):
    index = tmp_path / "index"
    clap("index", toy / "audio", "--index", index, "--model", trained / "final")
    hits = 0
    for kind in KINDS:
        result = clap("search", CAPTIONS[kind][0], "--index", index, "--json", "-k", "5")
        top = [json.loads(line)["path"] for line in result.output.splitlines() if line.startswith("{")]
        assert len(top) == 5
        hits += sum(kind_of(p) == kind for p in top)
    assert hits >= 12, hits  # of 20 results; chance gives 5


def test_run_directory_holds_config_log_and_loadable_checkpoints(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["train"]["batch_size"] == 16 and config["model"]["preset"] == "tiny"
    first = log_records(trained)[0]
    assert first["event"] == "start" and first["steps_per_epoch"] > 0
    step = next(r for r in log_records(trained) if "loss" in r)
    assert {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_s"} <= set(step)
    assert (trained / "final" / "trainer_state.pt").is_file() and (trained / "best" / "model.safetensors").is_file()
    steps = sorted(p.name for p in trained.iterdir() if p.name.startswith("step-"))
    assert len(steps) == 2  # --keep 2: the newest two epoch-end checkpoints


def _train_args(toy, run, *extra, workers=0):
    return ["train", "--data", str(toy / "shards" / "train"), "--tokenizer", str(toy / "tok"), "--out", str(run),
            "--model-config", "tiny", "--workers", str(workers), "--log-every", "1", "--epochs", "2",
            "--batch-size", "8", "--lr", "1e-3", "--warmup", "3", "--seed", "3", "--log-samples", *extra]


def _children(pid: int) -> list[int]:
    """Every process below `pid` (its data workers), read from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        kids = [c for c, p in parents.items() if p in frontier]
        found += kids
        frontier = kids
    return found


def test_resume_after_sigkill_equals_a_straight_run(toy, tmp_path):
    """Two data workers (the DataLoader's round robin) and a checkpoint in the middle of the first epoch."""
    straight = tmp_path / "straight"
    clap(*_train_args(toy, straight, workers=2))
    assert max(step_records(straight)) == 12  # 48 samples, batch 8, 2 epochs
    half = 3  # in the middle of the first epoch

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([clap_executable(), *_train_args(toy, resumed, "--save-every", str(half), workers=2)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (resumed / f"step-{half}" / "trainer_state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (resumed / "final").exists(), "the run ended before it could be killed; make it longer"
    deadline = time.time() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert workers and not any(Path(f"/proc/{pid}").exists() for pid in workers), "data workers outlived the run"
    clap(*_train_args(toy, resumed, "--save-every", str(half), "--resume", workers=2))

    a, b = weights(straight / "final"), weights(resumed / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    s, r = step_records(straight), step_records(resumed)
    assert [s[i]["lr"] for i in sorted(s)] == [r[i]["lr"] for i in sorted(r)]
    assert [s[i]["keys"] for i in sorted(s)] == [r[i]["keys"] for i in sorted(r)]
    per_epoch = {}
    for rec in r.values():
        per_epoch.setdefault(rec["epoch"], []).extend(rec["keys"])
    assert all(len(keys) == len(set(keys)) for keys in per_epoch.values())  # no sample twice in an epoch
    assert any(rec.get("event") == "resumed" for rec in log_records(resumed))


def test_a_directory_with_another_run_is_refused(toy, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    clap(*_train_args(toy, run, "--max-steps", "1"))
    code, err = run_main(monkeypatch, capsys, *_train_args(toy, run, "--max-steps", "1"))
    assert code == 2 and "--resume" in err and err.count("\n") == 1
    other = [a if a != "1e-3" else "5e-4" for a in _train_args(toy, run, "--max-steps", "1", "--resume")]
    code, err = run_main(monkeypatch, capsys, *other)
    assert code == 2 and "differs in: lr" in err


@pytest.mark.parametrize("source", ["hf", "laion"])
def test_init_from_released_formats_trains_and_loads_back(toy, tiny_fused, tmp_path, source):
    from clapcli import load_model
    from test_checkpoints import laion_state_dict

    model_dir, hf_model = tiny_fused[0], tiny_fused[1]
    init = model_dir
    if source == "laion":
        init = tmp_path / "laion.pt"
        torch.save({"state_dict": laion_state_dict(hf_model), "epoch": 3}, init)
    run = tmp_path / "run"
    args = ["train", "--data", toy / "shards", "--init", init, "--out", run, "--workers", "0", "--max-steps", "2",
            "--batch-size", "4", "--freeze-text", "--lr", "1e-3", "--warmup", "1"]
    if source == "laion":
        args += ["--tokenizer", model_dir]
    clap(*args)
    before, after = load_model(init, device="cpu", tokenizer=str(model_dir)), load_model(run / "final", device="cpu")
    assert after.config.to_dict() == before.config.to_dict()
    b, a = before.model.state_dict(), after.model.state_dict()
    text = [k for k in b if k.startswith("text_model.")]
    audio = [k for k in b if k.startswith("audio_model.") and b[k].is_floating_point()]
    assert text and all(torch.equal(a[k], b[k]) for k in text)  # --freeze-text: bit-identical tower
    assert any(not torch.equal(a[k], b[k]) for k in audio)  # the audio tower did train


def one_error(stderr: str) -> str:
    """The one `error:` line of a failed run (progress lines may precede it; no traceback may follow)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def test_data_errors_are_one_line(toy, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "000000.tar").write_bytes(b"not a tar at all" * 10)
    (bad / "sizes.json").write_text('{"000000.tar": 4}')
    fresh = ["--model-config", "tiny", "--tokenizer", toy / "tok", "--workers", "0"]
    code, err = run_main(monkeypatch, capsys, "train", "--data", bad, *fresh, "--out", tmp_path / "r",
                         "--batch-size", "2")
    assert code == 1 and "000000.tar" in one_error(err)
    no_caption = tmp_path / "nocap"
    writer = ShardWriter(no_caption, shard_size=8)
    for i in range(4):
        writer.add(f"k{i}", encode_flac(np.zeros(4800, np.float32) + 0.1), {"tag": ["x"]})
    writer.close()
    code, err = run_main(monkeypatch, capsys, "train", "--data", no_caption, *fresh, "--out", tmp_path / "r1",
                         "--batch-size", "2")
    assert code == 1 and re.search(r"000000\.tar: k\d: no caption", one_error(err))
    code, err = run_main(monkeypatch, capsys, "train", "--data", toy / "shards", *fresh, "--out", tmp_path / "r3",
                         "--precision", "fp16", "--device", "cpu")
    assert code == 2 and "fp16" in err
    code, err = run_main(monkeypatch, capsys, "train", "--data", toy / "shards", *fresh, "--out", tmp_path / "r4",
                         "--batch-size", "512")
    assert code == 1 and "lower --batch-size" in err


def test_torchrun_two_ranks_train_in_step(toy, tmp_path):
    """Two Gloo ranks on the CPU: the same number of steps, one log and one set of checkpoints (rank 0), and
    the same parameters on both ranks after training (each rank saw other samples: only the gradient
    all-reduce keeps them equal), which are the ones in final/."""
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", CLAP_TEST_PARAMS=str(tmp_path / "params"))
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).parent / "train_ranks.py"), "train",
                           "--data", str(toy / "shards"), "--model-config", "tiny", "--tokenizer", str(toy / "tok"),
                           "--out", str(run), "--workers", "0", "--batch-size", "4", "--max-steps", "3",
                           "--log-every", "1", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    start = log_records(run)[0]
    assert start["world_size"] == 2
    assert sorted(step_records(run)) == [1, 2, 3]
    assert (run / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in log_records(run) if "val" in r] == [3]  # stopped inside the epoch: validated at the end
    rank0, rank1 = (torch.load(tmp_path / "params" / f"rank-{r}.pt", weights_only=True) for r in (0, 1))
    initial = torch.load(tmp_path / "params" / "rank-0-initial.pt", weights_only=True)
    assert rank0.keys() == rank1.keys() == initial.keys()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # they trained
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = weights(run / "final")
    common = [k for k in rank0 if k in saved]
    assert len(common) > len(rank0) // 2 and all(torch.equal(saved[k], rank0[k]) for k in common)


def test_a_second_run_on_a_live_run_folder_fails_at_once_naming_its_pid(toy, tmp_path, monkeypatch, capsys):
    """Two runs (or a --resume while the first is alive) would write one folder, each pruning the other's
    checkpoints: the run holds a lock on its folder for its lifetime."""
    run = tmp_path / "run"
    args = _train_args(toy, run, "--save-every", "1")
    args[args.index("--epochs") + 1] = "50"  # alive for the whole test
    proc = subprocess.Popen([clap_executable(), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while not (run / "step-1" / "trainer_state.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
            time.sleep(0.05)
        for extra in ([], ["--resume"]):
            code, err = run_main(monkeypatch, capsys, *_train_args(toy, run, "--max-steps", "1", *extra))
            assert code == 1 and f"in use by another training run (pid {proc.pid})" in one_error(err), err
        assert proc.poll() is None and not (run / "final").exists()
    finally:
        proc.kill()
        proc.wait()
    for pid in _children(proc.pid):  # its data workers hold the lock too until they notice
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 15
    while True:  # once the holder is gone, the run resumes
        code, err = run_main(monkeypatch, capsys, *_train_args(toy, run, "--max-steps", "1", "--resume"))
        if code == 0 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert code == 0, err


def test_config_json_is_replaced_whole_or_not_at_all(toy, tmp_path, monkeypatch, capsys):
    """The disk fills up while a resume writes config.json: the next --resume still reads the run's options."""
    import builtins
    import errno
    import io

    run = tmp_path / "run"
    args = _train_args(toy, run, "--max-steps", "1")
    clap(*args)
    real_open = io.open

    def full_disk(file, mode="r", *a, **k):
        name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        if "w" in mode and Path(name).parent == run and Path(name).name.startswith("config.json"):
            real_open(file, mode, *a, **k).close()  # opened (a "w" open truncates), then the write fails
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(io, "open", full_disk)
    monkeypatch.setattr(builtins, "open", full_disk)
    code, err = run_main(monkeypatch, capsys, *args, "--resume")
    assert code == 1 and "No space left" in err
    monkeypatch.undo()
    assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 1
    clap(*args, "--resume")
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]


def test_resume_clears_half_written_folders_and_restores_a_set_aside_one(toy, tmp_path):
    """A kill during a save leaves NAME.PID.HEX.tmp (gone on resume, not kept forever); a crash between the
    two renames of a save leaves final/ only as final.PID.HEX.old (put back, and resumed from)."""
    from clapcli.atomic import old_path, temp_path

    run = tmp_path / "run"
    args = _train_args(toy, run, "--max-steps", "2", "--save-every", "1")
    clap(*args)
    final = weights(run / "final")
    os.rename(run / "final", old_path(run / "final"))
    half = temp_path(run / "step-3")
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"\0" * 100_000)
    config_tmp = temp_path(run / "config.json")
    config_tmp.write_text("{")

    clap(*args, "--resume")
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(("log.", "run.", "tensorboard"))) == [
        "config.json", "final", "step-1", "step-2"]
    resumed = [r for r in log_records(run) if r.get("event") == "resumed"]
    assert resumed and Path(resumed[-1]["from"]).name == "final" and resumed[-1]["step"] == 2
    again = weights(run / "final")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_other_ranks_wait_for_rank_0_validation_longer_than_the_collective_timeout(toy, tmp_path):
    """Rank 0 alone validates and saves while the others wait: with --dist-timeout 4 for the step's
    collectives, a validation of 12 s still ends with the run done on both Gloo ranks, not aborted."""
    run = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, OMP_NUM_THREADS="1", CLAP_TEST_DELAY="12")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).parent / "slow_main_rank.py"), "train",
                           "--data", str(toy / "shards"), "--model-config", "tiny", "--tokenizer", str(toy / "tok"),
                           "--out", str(run), "--workers", "0", "--batch-size", "4", "--max-steps", "1",
                           "--device", "cpu", "--dist-timeout", "4"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = log_records(run)
    assert [r["step"] for r in records if "val" in r] == [1] and records[-1]["event"] == "done"
    assert (run / "final" / "model.safetensors").is_file()


def test_without_init_or_model_config_the_default_model_is_adapted(toy, tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    """`clap train --data shards/` adapts the model every other command uses: its weights not in the cache, the
    one-line message `load_model` gives; with $CLAP_MODEL naming a local model, a run that adapts it."""
    from clapcli import load_model
    from clapcli.errors import WeightsNotAvailable

    with pytest.raises(WeightsNotAvailable) as missing:
        load_model(device="cpu")
    code, err = run_main(monkeypatch, capsys, "train", "--data", toy / "shards", "--out", tmp_path / "r")
    assert code == 1 and one_error(err) == f"error: {missing.value}"

    monkeypatch.setenv("CLAP_MODEL", str(tiny_model_dir))
    run = tmp_path / "adapted"
    clap("train", "--data", toy / "shards" / "train", "--out", run, "--workers", "0", "--max-steps", "1",
         "--batch-size", "4")
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["init"] == str(tiny_model_dir) and config["model"]["source"] == str(tiny_model_dir)
    assert load_model(run / "final", device="cpu").config.to_dict() == load_model(device="cpu").config.to_dict()


def test_keep_checkpoints_and_its_hidden_old_name(toy, tmp_path):
    for option in ("--keep-checkpoints", "--keep"):
        run = tmp_path / option.strip("-")
        clap(*_train_args(toy, run, "--max-steps", "3", "--save-every", "1", option, "1"))
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-3"]
        assert json.loads((run / "config.json").read_text())["train"]["keep_checkpoints"] == 1
    import typer.main

    from clapcli.cli.main import app

    shown = {opt for p in typer.main.get_command(app).commands["train"].params if not p.hidden for opt in p.opts}
    assert "--keep-checkpoints" in shown and "--keep" not in shown  # --help shows the new name only


def test_train_options_are_the_train_config_fields_with_its_defaults():
    """Every option of `clap train` but --out and --json sets the TrainConfig field of its name, and
    defaults to that field's default (written once, in the dataclass)."""
    import typer.main

    from clapcli.cli.main import app
    from clapcli.train.config import TrainConfig

    command = typer.main.get_command(app).commands["train"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    options = {p.name: p for p in command.params}
    assert set(options) - set(fields) == {"as_json", "keep"}  # --keep: the hidden old name of --keep-checkpoints
    assert set(fields) - set(options) == {"beta1", "beta2", "eps", "val_every_epochs", "shuffle_buffer"}
    for name, field in fields.items():
        if name in options and field.default is not dataclasses.MISSING:
            assert options[name].default == field.default, name


def test_the_loop_validates_in_eval_mode_trains_in_train_mode_and_keeps_best(toy, tmp_path, monkeypatch):
    """Validation measures an inference embedder of the model in eval mode; the loop owns the mode (training
    mode again for the next step) and writes best/ itself, without the optimizer."""
    from clapcli.train import loop

    seen = []
    real_validate, real_step = loop.validate, loop.train_step

    def spy_validate(first, *args, **kwargs):
        seen.append(("validate", getattr(first, "model", first).training))
        return real_validate(first, *args, **kwargs)

    def spy_step(model, *args, **kwargs):
        seen.append(("step", model.training))
        return real_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "validate", spy_validate)
    monkeypatch.setattr(loop, "train_step", spy_step)
    run = tmp_path / "run"
    clap("train", "--data", toy / "shards", "--tokenizer", toy / "tok", "--out", run, *TRAIN, "--batch-size", "8",
         "--epochs", "2", "--max-steps", "7")
    assert [kind for kind, _ in seen].count("validate") == 2 and seen[6][0] == "validate"  # epoch 1 and the end
    assert all(not training for kind, training in seen if kind == "validate")
    assert all(training for kind, training in seen if kind == "step")
    state = torch.load(run / "best" / "trainer_state.pt", weights_only=True)
    assert state["optimizer"] is None and state["state"]["best_step"] in (6, 7)


def test_resume_with_dropout_repeats_a_straight_run_from_no_saved_rng(toy, tmp_path):
    """Dropout draws from torch's generator, which the loop seeds per step from (seed, step, rank): a resumed
    run repeats a straight one without any RNG state in trainer_state.pt."""
    from clapcli.models.checkpoints import save_own
    from clapcli.models.clap import ClapModel
    from clapcli.train.prepare import fresh_model

    model, tokenizer = fresh_model("tiny", None, str(toy / "tok"))
    cfg = model.config
    cfg.audio.drop_rate = cfg.audio.attn_drop_rate = cfg.text.hidden_dropout_prob = 0.3
    torch.manual_seed(0)
    save_own(ClapModel(cfg), tokenizer, tmp_path / "dropout")

    def args(run, *extra):
        return ["train", "--data", toy / "shards" / "train", "--init", tmp_path / "dropout", "--out", run,
                "--workers", "0", "--batch-size", "8", "--lr", "1e-3", "--warmup", "1", "--log-every", "1", *extra]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    clap(*args(straight, "--max-steps", "4"))
    clap(*args(resumed, "--max-steps", "2"))
    clap(*args(resumed, "--max-steps", "4", "--resume"))
    a, b = weights(straight / "final"), weights(resumed / "final")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    s, r = step_records(straight), step_records(resumed)
    assert [s[i]["loss"] for i in sorted(s)] == pytest.approx([r[i]["loss"] for i in sorted(r)], rel=1e-5)
    state = torch.load(resumed / "final" / "trainer_state.pt", weights_only=True)
    assert "torch_rng" not in state
