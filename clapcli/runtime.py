"""Where and at what precision a model runs: `--device` and `--precision` resolved once, for every command.

    device = resolve_device("auto")                       # cuda when torch sees a GPU, else cpu
    precision = resolve_precision("auto", device)         # bf16 where native, else fp32
    with autocast(device, precision):
        ...

Inference accepts auto|fp32|bf16 (`INFERENCE_PRECISIONS`, the default); training passes
`allowed=TRAINING_PRECISIONS` (fp32|bf16|fp16: fp16 needs a loss scaler, which is the trainer's business).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from .errors import ClapError, UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # every name resolve_precision knows
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16")  # what embed/index/search/tag accept
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")  # what training accepts
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None) -> torch.device:
    """`auto` (or None) → cuda when available, else cpu; `cpu`, `cuda`, `cuda:N` as given."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ClapError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda") from exc


def native_bf16(device: torch.device) -> bool:
    """True where bf16 matrix work runs natively: recent CUDA GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return " avx512_bf16" in flags or " amx_bf16" in flags
    return False


def resolve_precision(
    name: str | None, device: torch.device, allowed: tuple[str, ...] = INFERENCE_PRECISIONS
) -> str:
    """The precision to run at: one of `allowed`, with `auto` (or None) → bf16 where native, else fp32.

    None means `auto` only where `allowed` has it, else fp32. An unknown or disallowed name is a
    UsageError naming the choices.
    """
    if name is None:
        name = "auto" if "auto" in allowed else "fp32"
    name = name.lower()
    if name not in allowed:
        raise UsageError(f"unknown precision {name!r}; choose one of: {', '.join(allowed)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


def autocast(device: torch.device, precision: str):
    """A context manager running matrix work at `precision` (a resolved name); fp32 is a no-op."""
    if precision == "fp32":
        return nullcontext()
    if precision not in _DTYPES:
        raise ValueError(f"autocast needs a resolved precision (fp32, bf16 or fp16), got {precision!r}")
    return torch.autocast(device.type, dtype=_DTYPES[precision])
