"""Reading weights into a model, strictly: the record a loader returns, safe readers for `.pt` and
`.safetensors` files, and `build_and_load`, which fails with a readable key/shape diff on any mismatch.
checkpoints.py (every checkpoint format, whole or its text half alone) loads through these.

Nothing here executes pickled code: `.pt` files go through `torch.load(weights_only=True)`, and only on a torch
with no known way around it (`SAFE_TORCH`, also the floor in pyproject.toml).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, first_line
from .clap import ClapModel
from .config import ClapConfig

OWN_FORMAT = "clapcli"
# The first torch whose weights_only unpickler has no published bypass: 2.6 fixed CVE-2025-32434 (code run
# through weights_only=True), 2.10 fixed CVE-2026-24747 (memory corruption from a crafted .pt, GHSA-63cw-57p8-fm3p).
SAFE_TORCH = (2, 10)
OWN_FORMAT_VERSION = 1

# Buffers a model rebuilds from its config. Checkpoints may carry them or not; they are never compared.
DERIVED_KEY = re.compile(r"(embeddings\.position_ids|embeddings\.token_type_ids|relative_position_index|attn_mask)$")


@dataclass
class LoadedCheckpoint:
    model: ClapModel
    tokenizer: Any
    name: str  # what the user asked for
    source: str  # resolved local path
    kind: str  # "huggingface" | "laion" | "wav2clip" | "clapcli"
    fingerprint: str  # short hash of the weights file(s)


def safe_torch_load(path: Path) -> Any:
    import pickle

    found = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if found is None or tuple(map(int, found.groups())) < SAFE_TORCH:
        raise CheckpointError(
            f"refusing to load {path} with torch {torch.__version__}: a crafted .pt file can run code in it even with "
            f"weights_only=True (CVE-2026-24747); upgrade to torch>={'.'.join(map(str, SAFE_TORCH))} or use a "
            "safetensors model")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = first_line(exc)
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors, which could run code "
            f"({reason[:160]}). Only plain state dicts are loaded; convert it with a trusted tool first"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as a torch checkpoint: {first_line(exc)}") from exc


def read_safetensors(path: Path, prefixes: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of every *.safetensors file in `path`, memory-mapped (pages are read when first touched,
    and `build_and_load` makes them the model's parameters: no second copy). With `prefixes`, only the
    keys that start with one of them are taken: the rest of the file is never read."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights (pytorch_model.bin is not loaded: it is a pickle)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as handle:
                for key in handle.keys():
                    if prefixes is None or key.startswith(prefixes):
                        state[key] = handle.get_tensor(key)
        except (OSError, RuntimeError, ValueError) as exc:  # safetensors raises SafetensorError (a RuntimeError)
            raise CheckpointError(f"cannot read {f}: {first_line(exc)}") from exc
    return state


def build_and_load(cfg: ClapConfig, state: dict[str, torch.Tensor], source: str, module=ClapModel) -> torch.nn.Module:
    """`module(cfg)` (ClapModel by default) with the weights of `state`, strictly: any missing, unused or
    misshapen tensor is a CheckpointError listing them. The module is built with its parameters on the
    `meta` device (no random initialisation, no memory) and `state`'s tensors become its parameters
    (`assign=True`: a memory-mapped state is not copied); buffers derived from the config (position ids,
    attention masks) are computed for real, and BatchNorm statistics come from `state`."""
    with parameters_on_meta():
        model = module(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not DERIVED_KEY.search(k)}
    given = {k: v for k, v in state.items() if not DERIVED_KEY.search(k)}
    diff = state_dict_diff(expected, given)
    if diff:
        raise CheckpointError(f"{source} does not match the architecture it declares:\n{diff}")
    # assign keeps the checkpoint's dtype: cast where it differs (an fp16 file into an fp32 model)
    given = {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in given.items()}
    given = _unaliased(given)
    model.load_state_dict(given, strict=False, assign=True)  # strict in effect: the diff above is empty
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: {len(left)} tensors were not loaded (e.g. {left[0]})")
    return model.eval()


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` with every tensor that is the same memory as an earlier one (one tensor under two names, as a
    converter may fill two scales from one value) replaced by a copy: assigned as they are, aliases would
    become tied parameters that train together and that safetensors refuses to save."""
    seen: set[tuple] = set()
    out = {}
    for name, tensor in state.items():
        where = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.stride())
        out[name] = tensor.clone() if where in seen and tensor.numel() else tensor
        seen.add(where)
    return out


# The torch.nn.init functions made no-ops while a model is built on `meta`: its parameters get their values
# from the checkpoint, and some of these (normal_, trunc_normal_) would import torch._dynamo for meta tensors.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextmanager
def parameters_on_meta():
    """Within this block, every parameter a module registers lives on the `meta` device and torch.nn.init
    does nothing: constructing a model allocates no weights and runs no random initialisation. Buffers stay
    real (so buffers a module computes from its config, like position ids or attention masks, keep their
    values). Not thread-safe: it patches torch.nn.Module.register_parameter for the duration."""
    register = torch.nn.Module.register_parameter
    inits = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    def skip(tensor, *args, **kwargs):
        return tensor

    torch.nn.Module.register_parameter = on_meta
    for name in inits:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        for name, fn in inits.items():
            setattr(torch.nn.init, name, fn)


def state_dict_diff(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], limit: int = 12) -> str:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"  {k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if tuple(expected[k].shape) != tuple(given[k].shape)
    ]
    parts = []
    for title, rows in (
        ("missing from the checkpoint", [f"  {k}" for k in missing]),
        ("not used by the model", [f"  {k}" for k in unexpected]),
        ("shape mismatches", shapes),
    ):
        if rows:
            more = f"\n  … and {len(rows) - limit} more" if len(rows) > limit else ""
            parts.append(f"{len(rows)} {title}:\n" + "\n".join(rows[:limit]) + more)
    return "\n".join(parts)
