"""Device and precision resolution (`clapcli.runtime`), shared by inference and training."""

from __future__ import annotations

import pytest
import torch

from clapcli import runtime
from clapcli.errors import ClapError, UsageError
from clapcli.runtime import (
    INFERENCE_PRECISIONS,
    TRAINING_PRECISIONS,
    autocast,
    resolve_device,
    resolve_precision,
)

CPU = torch.device("cpu")


def test_resolve_device():
    assert resolve_device("cpu") == CPU and resolve_device("CPU") == CPU
    assert resolve_device(None) == resolve_device("auto") == torch.device(
        "cuda" if torch.cuda.is_available() else "cpu"
    )
    with pytest.raises(UsageError, match="unknown device 'quantum'"):
        resolve_device("quantum")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_runtime_error():
    with pytest.raises(ClapError, match="no CUDA device") as info:
        resolve_device("cuda")
    assert not isinstance(info.value, UsageError)


# Each machine class as its flags describe it: auto is fp32 on all of them (the faithful rule), while bf16
# asked for by name counts as native exactly where the hardware has it.
MACHINE_CLASSES = {
    "avx2-only": ({"sse4_2", "avx", "avx2", "fma"}, None),
    "avx512-bf16-vnni": ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, None),
    "amx": ({"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}, None),
    "cuda-with-bf16": (set(), True),
    "cuda-without-bf16": (set(), False),
}


@pytest.mark.parametrize("machine", MACHINE_CLASSES)
def test_auto_is_fp32_on_every_cpu_class_and_gpu(monkeypatch, machine):
    flags, cuda_bf16 = MACHINE_CLASSES[machine]
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: set(flags))
    device = CPU
    if cuda_bf16 is not None:
        device = torch.device("cuda")
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert resolve_precision("auto", device) == resolve_precision(None, device) == "fp32"
    assert runtime.native_bf16(device) == (bool(cuda_bf16) or "avx512_bf16" in flags)
    assert resolve_precision("fp32", device) == "fp32" and resolve_precision("BF16", device) == "bf16"


def test_fp32_turns_tf32_off_on_cuda_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with autocast(torch.device("cuda"), "fp32"):  # sets flags only: runs without a GPU
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_inference_refuses_fp16_and_training_accepts_it():
    assert INFERENCE_PRECISIONS == ("auto", "fp32", "bf16", "int8")
    with pytest.raises(UsageError, match="unknown precision 'fp16'; choose one of: auto, fp32, bf16, int8"):
        resolve_precision("fp16", CPU)
    assert resolve_precision("fp16", CPU, allowed=TRAINING_PRECISIONS) == "fp16"
    assert resolve_precision(None, CPU, allowed=TRAINING_PRECISIONS) == "fp32"  # no auto there
    with pytest.raises(UsageError, match="choose one of: fp32, bf16, fp16"):
        resolve_precision("int4", CPU, allowed=TRAINING_PRECISIONS)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_autocast_runs_matrix_work_at_the_precision(precision, dtype):
    a = torch.randn(4, 8)
    with autocast(CPU, precision):
        assert (a @ a.T).dtype == dtype
    with pytest.raises(ValueError, match="resolved precision"):
        autocast(CPU, "auto")
