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


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_exactly_where_it_is_native(monkeypatch, native, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    assert resolve_precision("auto", CPU) == resolve_precision(None, CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("BF16", CPU) == "bf16"


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
