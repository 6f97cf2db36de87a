"""Where and at what precision a model runs: `--device` and `--precision` resolved once, for every command.

    device = resolve_device("auto")                       # cuda when torch sees a GPU, else cpu
    precision = resolve_precision("auto", device)         # fp32 on every machine (the faithful rule)
    if precision == "int8":
        quantize_int8(model)                              # dynamic int8 Linear layers (CPU only)
    with autocast(device, precision):                     # fp32: true fp32 (no TF32 on CUDA); int8: no-op
        ...

Inference accepts auto|fp32|bf16|int8 (`INFERENCE_PRECISIONS`, the default); training passes
`allowed=TRAINING_PRECISIONS` (fp32|bf16|fp16: fp16 needs a loss scaler, which is the trainer's business).

The rule for `auto`: every output stays within cosine 0.9999 of fp32 and a file's embedding does not depend
on what else is in its batch (within 1e-5), on every CPU class and on GPUs; within that, the fastest path.
Measured with full-size random models of every encoder family (benchmarks/bench_precision.py, RESULTS.md),
only fp32 keeps both: bf16 (AVX512-BF16/AMX CPUs, GPUs) leaves the references (cosine down to ~0.9997) and
moves a file's vector with its batch mates (~1e-3), which a resumed or incremental `clap index` would store
as vectors a clean build does not reproduce; int8 is further still. So `auto` is fp32 everywhere, and bf16
and int8 are asked for by name, as speed traded for fidelity.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .errors import ClapError, UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # every name resolve_precision knows
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "int8")  # what embed/index/search/tag accept
TRAINING_PRECISIONS = ("fp32", "bf16", "fp16")  # what training accepts
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
AUTO_PRECISION = "fp32"  # what `auto` resolves to, on every CPU class and GPU (the rule in the docstring)


class SlowPrecisionWarning(UserWarning):
    """A precision was asked for that this device runs slower than fp32."""


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
        return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})
    return False


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (Linux); elsewhere torch's capability name (AVX2, AVX512, ...),
    which names no bf16 support, so bf16 then counts as not native."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {torch.backends.cpu.get_cpu_capability().lower()}
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(
    name: str | None, device: torch.device, allowed: tuple[str, ...] = INFERENCE_PRECISIONS
) -> str:
    """The precision to run at: one of `allowed`, with `auto` (or None) → fp32 on every device (see above).

    None means `auto` only where `allowed` has it, else fp32. An unknown or disallowed name is a
    UsageError naming the choices; int8 on a GPU is a UsageError too (dynamic quantisation is a CPU
    path). bf16 asked for by name on a CPU without native bf16 runs, with a warning that it is slower.
    """
    if name is None:
        name = "auto" if "auto" in allowed else "fp32"
    name = name.lower()
    if name not in allowed:
        raise UsageError(f"unknown precision {name!r}; choose one of: {', '.join(allowed)}")
    if name == "auto":
        return AUTO_PRECISION
    if name == "int8" and device.type != "cpu":
        raise UsageError(f"--precision int8 runs on the CPU only (PyTorch dynamic quantisation); on {device.type} "
                         "use bf16 or fp32, or pass --device cpu")
    if name == "bf16" and device.type == "cpu" and not native_bf16(device):
        warnings.warn("this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 runs several times slower "
                      "than fp32 here; int8 is the fast CPU precision", SlowPrecisionWarning, stacklevel=2)
    return name


def autocast(device: torch.device, precision: str):
    """A context manager running matrix work at `precision` (a resolved name). int8 is a no-op (the model's
    Linear layers are quantised instead, see `quantize_int8`); so is fp32 on the CPU, while on CUDA fp32 turns
    TF32 off for its duration (cuDNN convolutions use TF32 by default on Ampere and later, a 10-bit mantissa
    that would make "fp32" neither exact nor independent of the batch)."""
    if precision == "int8" or (precision == "fp32" and device.type != "cuda"):
        return nullcontext()
    if precision == "fp32":
        return exact_fp32()
    if precision not in _DTYPES:
        raise ValueError(f"autocast needs a resolved precision (fp32, bf16, fp16 or int8), got {precision!r}")
    return torch.autocast(device.type, dtype=_DTYPES[precision])


@contextmanager
def exact_fp32():
    """Matrix work and convolutions on CUDA at full fp32 (TF32 off) inside the block; restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every nn.Linear of `model` (in place) by a dynamically quantised int8 one: weights stored as
    int8 per tensor, activations quantised on the fly per batch; biases and every other layer stay fp32.
    For inference on the CPU only. Returns `model`."""
    from torch import nn

    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao on every call
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
