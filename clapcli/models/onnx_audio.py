"""The onnxruntime engine: the HTSAT audio encoder exported once to ONNX and run by onnxruntime on the CPU.

    runner = OnnxHTSAT(model.audio_model.audio_encoder, weights_fingerprint, "int8")   # nothing runs yet
    model.audio_runner = runner       # ClapModel.encode_audio calls it in inference (no grad, eval mode)

Why: on a CPU, onnxruntime runs the same HTSAT forward faster than PyTorch eager (its fused LayerNorm and
GELU kernels, fewer copies and transposes): 1.10-1.26x at fp32 and 1.3-1.4x PyTorch's dynamic int8 with its
own dynamic int8 (the MatMuls with weights; the attention's own products stay fp32, as in PyTorch's). `auto`
uses it for int8 only (see `resolve_engine`). Measured in benchmarks/RESULTS.md.

What is exported: the encoder from the folded mel image(s) to the pooled features, with the batch size free.
The BatchNorm over mel bins and the bicubic fold (`HTSAT.normalise`, `HTSAT.fold`) stay in PyTorch, so the
graphs hold no data-dependent shapes. Two graphs: "global" (the global image only: every clip of an unfused
model, and a fused model's batches with no clip marked `is_longer`, such as 10 s windows) and, for fused
models, "fused": every clip's global image, a local-crop image (zeros for a clip not marked `is_longer`) and
the `is_longer` flags, selecting the AFF-fused patch map only where the flag is set, which is the PyTorch
encoder's rule (AFF for longer clips only).

The ONNX files are a cache (`cache_dir()/onnx/`, one file per graph and precision), keyed by the weights'
fingerprint, the audio config, this module's EXPORT_VERSION and the torch version: exported on first use (a
few seconds for the full-size model; int8 is quantised from an fp32 export by onnxruntime's
`quantize_dynamic`, MatMul only, from the cached fp32 file or else from a temporary export of this process's
own, removed after), then read
back by every later process. Files are written atomically; two processes exporting at once both succeed and
the last rename wins (the files are equal). A cached file that onnxruntime cannot load (damaged on disk) is
deleted and exported again, once; an int8 file is then quantised again, from a fresh fp32 export if the cached
fp32 file cannot be read either. Temporaries left in the cache by a killed export (`<name>.<pid>.<hex>.tmp`,
see clapcli.atomic) are removed once they are `STALE_TEMP_S` old: an export rewrites its temporary within
seconds, and the age holds for a cache shared between machines, where a pid says nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write, temp_path
from ..errors import ClapError, UsageError
from ..home import cache_dir
from .htsat import HTSAT

log = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the exported graph changes: old cache files are then never read
ENGINES = ("auto", "torch", "onnx")
ONNX_PRECISIONS = ("fp32", "int8")
INSTALL_HINT = "pip install onnxruntime onnx (dependencies of clapcli that this installation lacks)"
STALE_TEMP_S = 600.0  # a temporary in the cache this old was left by a killed export
_TEMP_NAME = re.compile(r".+\.\d+\.[0-9a-f]{8}\.tmp")  # clapcli.atomic.temp_path's names


def onnxruntime_available() -> bool:
    """True when onnxruntime and onnx (for the export and the int8 quantiser) are installed (not imported:
    that waits for the first audio batch)."""
    from importlib.util import find_spec

    return find_spec("onnxruntime") is not None and find_spec("onnx") is not None


def supports(encoder: nn.Module) -> bool:
    """The encoders the onnx engine runs: HTSAT (every released LAION-CLAP checkpoint)."""
    return isinstance(encoder, HTSAT)


class _Exportable(nn.Module):
    """HTSAT from folded images to pooled features, with the AFF choice as a select on the flags."""

    def __init__(self, encoder: HTSAT):
        super().__init__()
        self.encoder = encoder

    def forward(self, image: torch.Tensor, local: torch.Tensor | None = None,
                longer: torch.Tensor | None = None) -> torch.Tensor:
        embed = self.encoder.patch_embed
        x = embed.proj(image)  # (B, D, 64, 64)
        if local is not None:
            fused = embed.fusion_model(x, embed.local_embedding(local, x.shape[-1]))
            x = torch.where(longer[:, None, None, None], fused, x)
        return self.encoder.encode_tokens(embed.tokens(x))


def cache_key(fingerprint: str, encoder: HTSAT) -> str:
    """What the exported graph depends on: the weights, the audio config, this module's graph, torch."""
    cfg = json.dumps(encoder.cfg.__dict__, sort_keys=True, default=str)
    text = f"{fingerprint}|{cfg}|{EXPORT_VERSION}|{torch.__version__}"
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


class OnnxHTSAT:
    """Callable like the encoder: (features (B, C, 1001, 64), is_longer (B,)) → pooled features (B, 8D).

    A plain object, not a module: the model's state_dict and parameters do not change. The session is made on
    the first call (a text-only user never pays for it); `threads` is onnxruntime's intra-op pool size
    (default: torch's thread count), with spinning off so decode workers on the same cores are not starved."""

    def __init__(self, encoder: HTSAT, fingerprint: str, precision: str = "fp32", threads: int | None = None):
        if precision not in ONNX_PRECISIONS:
            raise ClapError(f"the onnx engine runs fp32 or int8, not {precision}")
        self.encoder = encoder
        self.fused = bool(encoder.cfg.enable_fusion)
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.key = cache_key(fingerprint, encoder)
        self._sessions: dict = {}  # graph name → onnxruntime session, made on first use

    # ---- files --------------------------------------------------------------------------------------
    def path(self, graph: str = "global", precision: str | None = None) -> Path:
        return cache_dir() / "onnx" / f"htsat-{self.key}-{graph}-{precision or self.precision}.onnx"

    def ensure_file(self, graph: str = "global", precision: str | None = None) -> Path:
        """The ONNX file of `graph` ("global", or "fused" for the AFF path) at `precision` (default: the
        runner's), exported now (int8: quantised from the fp32 file, exported first if need be) unless cached."""
        precision = precision or self.precision
        target = self.path(graph, precision)
        remove_stale_temps(target.parent)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        if precision == "int8":
            cached = self.path(graph, "fp32")
            log.info("quantising the onnx audio encoder to int8 (once per model): %s", target)
            if cached.is_file():
                try:
                    atomic_write(target, writer=lambda tmp: _quantize(cached, tmp))
                    return target
                except Exception as exc:  # noqa: BLE001 - a damaged fp32 file: drop it, quantise a fresh export
                    log.warning("the cached onnx graph %s is damaged (%s): exporting it again", cached, exc)
                    cached.unlink(missing_ok=True)
            # export to a name of this process's own (4x the int8 file, only needed to make it), so a
            # concurrent export never loses its input
            temp = temp_path(cached)
            try:
                self._export(graph, temp)
                atomic_write(target, writer=lambda tmp: _quantize(temp, tmp))
            finally:
                temp.unlink(missing_ok=True)
        else:
            log.info("exporting the audio encoder to onnx (once per model): %s", target)
            atomic_write(target, writer=lambda tmp: self._export(graph, tmp))
        return target

    def _export(self, graph: str, path: Path) -> None:
        module = _Exportable(self.encoder).eval()
        b, side = 2, self.encoder.cfg.spec_size
        image = torch.zeros(b, 1, side, side)
        names, axes = ["image"], {"image": {0: "batch"}, "pooled": {0: "batch"}}
        args: tuple = (image,)
        if graph == "fused":
            args = (image, torch.zeros(b, 3, side, side), torch.tensor([True, False]))
            names += ["local", "longer"]
            axes.update(local={0: "batch"}, longer={0: "batch"})
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape arithmetic
                torch.onnx.export(module, args, str(path), input_names=names, output_names=["pooled"],
                                  dynamic_axes=axes, opset_version=17, dynamo=False)
        finally:
            self.encoder.train(was_training)

    # ---- running ------------------------------------------------------------------------------------
    def session(self, graph: str = "global"):
        if graph not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.log_severity_level = 3
            path = self.ensure_file(graph)
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime's own error types: a damaged cache file
                log.warning("the cached onnx graph %s cannot be loaded (%s): exporting it again", path, exc)
                path.unlink(missing_ok=True)
                session = ort.InferenceSession(str(self.ensure_file(graph)), options,
                                               providers=["CPUExecutionProvider"])
            self._sessions[graph] = session
        return self._sessions[graph]

    def __call__(self, features: torch.Tensor, is_longer: torch.Tensor | None = None) -> torch.Tensor:
        """A batch with no clip marked is_longer (every clip of an unfused model, every 10 s window of a fused
        one) runs the global graph; any other batch the fused graph, which selects AFF per clip."""
        enc = self.encoder
        image = enc.fold(enc.normalise(features[:, :1].float()))  # (B, 1, 256, 256)
        inputs = {"image": image.contiguous().numpy()}
        graph = "global"
        if self.fused and is_longer is not None and bool(is_longer.any()):
            graph = "fused"
            longer = is_longer.reshape(-1).to(torch.bool).cpu()
            local = torch.zeros(features.shape[0], 3, *image.shape[2:])
            idx = torch.nonzero(longer).flatten()
            local[idx] = enc.fold(enc.normalise(features[idx, 1:].float()))
            inputs.update(local=local.numpy(), longer=longer.numpy())
        (pooled,) = self.session(graph).run(None, inputs)
        return torch.from_numpy(pooled)


def remove_stale_temps(cache: Path, older_than: float = STALE_TEMP_S) -> int:
    """Delete the temporaries (clapcli.atomic names) in the onnx cache folder that are `older_than` seconds
    old, left by exports that were killed; returns how many."""
    removed, now = 0, time.time()
    try:
        entries = list(cache.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not _TEMP_NAME.fullmatch(entry.name):
            continue
        try:
            if now - entry.lstat().st_mtime > older_than:
                entry.unlink()
                removed += 1
        except OSError:
            pass  # gone meanwhile, or not ours to remove
    return removed


def _quantize(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()  # quantize_dynamic logs every tensor (INFO) and advice (WARNING) through the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"])
    finally:
        root.setLevel(level)


def resolve_engine(name: str | None, device: torch.device, encoder: nn.Module | None, precision: str) -> str:
    """None → $CLAP_ENGINE, else auto; `auto` → onnx on the CPU for an HTSAT encoder at int8 when onnxruntime
    is installed, else torch. `onnx` asked for by name (fp32 or int8) where it cannot run is a ClapError.

    Why auto leaves fp32 to torch: measured on the full-size model (benchmarks/RESULTS.md), onnxruntime's fp32
    forward is 1.10-1.26x torch's, which `clap index` (decode, windows, SQLite) turns into no measurable gain,
    while the first run would pay the export; its int8 forward is 1.3-1.4x torch's dynamic int8."""
    name = (name or os.environ.get("CLAP_ENGINE") or "auto").lower()
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose one of: {', '.join(ENGINES)}")
    if name == "torch" or encoder is None:  # no audio tower (text only): nothing for onnx to run
        return "torch"
    reason = None
    if device.type != "cpu":
        reason = f"it runs on the CPU only (this model is on {device.type})"
    elif not supports(encoder):
        reason = f"it runs HTSAT audio encoders only (this model's is {type(encoder).__name__})"
    elif precision not in ONNX_PRECISIONS:
        reason = f"it runs fp32 or int8 (asked: {precision})"
    elif not onnxruntime_available():
        reason = f"onnxruntime is not installed: {INSTALL_HINT}"
    if reason is None and (name == "onnx" or precision == "int8"):
        return "onnx"
    if name == "onnx":
        raise ClapError(f"--engine onnx cannot be used: {reason}")
    return "torch"
