"""Training checkpoints: a model in the project's own format plus what resuming needs.

    RUN/step-200/   config.json  model.safetensors  tokenizer files  trainer_state.pt
    RUN/best/       the same, for the best validation metric so far
    RUN/final/      the same, at the end of the run

Each folder is written beside its target and renamed into place (`atomic_directory`), so a crash leaves the
previous checkpoint whole and never a half-written one. The model folders load with `load_model` and work
in `index`, `search`, `tag` and `embed`. `trainer_state.pt` holds only tensors, numbers and strings, and is
read back with `torch.load(weights_only=True)`. It holds no RNG state: every random draw of a step is a
function of (seed, step, rank) (the loop reseeds torch before each step; crops and data order have their own
seeded generators), so a resumed run needs none to repeat a straight one.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import LEFTOVER, atomic_directory
from ..errors import TrainingError, first_line
from ..models.checkpoints import save_own
from .config import TrainState

STATE_FILE = "trainer_state.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")
LEGACY_LEFTOVER = re.compile(r"(?P<name>.+?)\.(?P<kind>tmp|old)-.*")  # names of an earlier atomic writer


def save_checkpoint(run_dir: Path, name: str, model, tokenizer, optimizer, scaler, state: TrainState,
                    extra: dict[str, Any] | None = None, objective: torch.nn.Module | None = None) -> Path:
    """Write RUN/name/ atomically: the model (own format) and the trainer state, which includes the
    objective's own parameters when it has any (wav2clip: the image head and its two logit scales)."""
    target = Path(run_dir) / name
    with atomic_directory(target) as tmp:
        save_own(model, tokenizer, tmp, extra)
        torch.save(
            {
                "state": dataclasses.asdict(state),
                "optimizer": optimizer.state_dict() if optimizer is not None else None,  # None in best/
                "scaler": scaler.state_dict() if scaler is not None else None,
                "objective": ({k: v.detach().cpu() for k, v in objective.state_dict().items()}
                              if objective is not None else None),
            },
            tmp / STATE_FILE,
        )
    return target


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete step-N/ folders of a run, oldest first."""
    found = []
    for p in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder to resume from: the newest step-N/ (its step is in its name), or final/ when that is
    newer (a finished run; only its trainer state is read, once)."""
    steps = step_checkpoints(run_dir)
    newest = steps[-1] if steps else None
    final = Path(run_dir) / "final"
    if (final / STATE_FILE).is_file() and (newest is None or read_state(final).step >= newest[0]):
        return final
    return newest[1] if newest else None


def read_state(checkpoint: Path) -> TrainState:
    return TrainState(**load_trainer_state(checkpoint)["state"])


def load_trainer_state(checkpoint: Path) -> dict:
    path = Path(checkpoint) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say which, never unpickle anything else
        raise TrainingError(f"cannot read {path}: {first_line(exc)}") from exc


def resume_state(checkpoint: str | Path, steps_per_epoch: int, run_dir: Path, same: str) -> tuple[TrainState, dict]:
    """The `TrainState` and trainer state (`load_trainer_state`) of a checkpoint to resume from; refused when
    it ran another number of steps per epoch than this setup gives (`same`: what must not change)."""
    saved = load_trainer_state(Path(checkpoint))
    state = TrainState(**saved["state"])
    if state.steps_per_epoch != steps_per_epoch:
        raise TrainingError(f"cannot resume {run_dir}: it ran {state.steps_per_epoch} steps per epoch, this "
                            f"setup gives {steps_per_epoch} ({same} needed)")
    return state, saved


def prune_step_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step-N/ folders."""
    steps = step_checkpoints(run_dir)
    for _, p in steps[: max(0, len(steps) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)


def clear_stale(run_dir: Path) -> None:
    """Tidy what a killed run left, by the names the atomic writer gives (`atomic.temp_path`, `old_path`):
    a half-written `NAME.PID.HEX.tmp` (a checkpoint folder, config.json) goes; a `NAME.PID.HEX.old` folder
    whose replacement never arrived (a crash between the two renames) is put back as NAME, else removed.
    Names of older versions (`NAME.tmp-…`, `NAME.old-…`) are tidied the same way. Only the holder of the run
    lock calls it."""
    for p in sorted(Path(run_dir).iterdir()):
        leftover = LEFTOVER.fullmatch(p.name) or LEGACY_LEFTOVER.fullmatch(p.name)
        if leftover is None:
            continue
        target = p.with_name(leftover["name"])
        if leftover["kind"] == "old" and not target.exists() and not target.is_symlink():
            p.rename(target)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
