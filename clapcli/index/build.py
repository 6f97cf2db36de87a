"""`clap index` below the CLI: one request in, the index built and the summary out.

The command parses its options into an `IndexRequest` and calls one function: `build` here in a single
process, or `distributed.build` under torchrun (the command decides once, from `dist.launched()`). From
there the data flows down only: this floor loads the model (`ModelLoader`, only when something needs
embedding), runs `indexer.build_index`, and after a single-process build saves the text-query graph
(`save_text_query`) so that later text searches run without torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from . import indexer
from .paths import check_remembered_model
from .summary import IndexSummary

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexRequest:
    """What `clap index` asks for, as the library takes it."""

    index_dir: Path
    roots: Sequence[str | os.PathLike] = ()  # folders or files; () means every one the index remembers
    model: str | None = None  # None: the model the index was built with (a new index: the default model)
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "auto"  # auto (fp32), fp32, bf16, int8
    engine: str | None = None  # what runs the audio encoder: None (auto), torch or onnx
    tokenizer: str | None = None  # for .pt checkpoints
    exclude: Sequence[str] = ()  # globs of paths or names to skip
    batch_size: int = 8  # clips per forward pass
    workers: int = 0  # decoding processes beside the model
    rebuild: bool = False  # embed everything into a fresh store, swapped in on success
    wait: bool = False  # wait for another writer instead of failing after a few seconds
    prune_empty: bool = False  # remove the files of folders that now list no audio
    forget: Sequence[str | os.PathLike] = ()  # remembered roots to drop, with their files
    forget_exclude: Sequence[str] = ()  # remembered --exclude globs to drop (their files are indexed again)
    commit_every: int = indexer.COMMIT_EVERY_FILES  # files per database commit

    def __post_init__(self):
        object.__setattr__(self, "index_dir", Path(self.index_dir).expanduser())

    @property
    def saves_text_query(self) -> bool:
        """Whether a build saves the text-query graph: not for a .pt checkpoint's own tokenizer, nor when the
        engine is torch by name (--engine or $CLAP_ENGINE)."""
        return not self.tokenizer and (self.engine or "auto").lower() != "torch"


class ModelLoader:
    """Loads the request's model by name (the one `--model` gives, or the one the index remembers) and keeps
    it: `model` is None until something needed embedding."""

    def __init__(self, request: IndexRequest):
        self.request = request
        self.model = None

    def __call__(self, name: str | None):
        from ..engine.load import load_model

        r = self.request
        if r.model is None:  # `name` is then the index's remembered model (or the default for a new index)
            check_remembered_model(name, r.index_dir, "pass its new place with --model NEW_PATH; the index then "
                                                      "remembers it")
        self.model = load_model(name, device=r.device, precision=r.precision, tokenizer=r.tokenizer, engine=r.engine)
        return self.model


def build(request: IndexRequest, *, on_plan: Callable | None = None, on_file: Callable | None = None,
          on_audio: Callable[[str, float, float], None] | None = None) -> IndexSummary:
    """Build or update the index in this process, then save the model's text-query graph (once per model).

    The callbacks are `indexer.build_index`'s: `on_plan(plan)`, `on_file(result)`, `on_audio(path, seconds,
    expected_seconds)`. Raises `indexer.IndexInterrupted` on Ctrl-C, ClapError on a refused run."""
    loader = ModelLoader(request)
    summary = indexer.build_index(request.roots, request.index_dir, loader, **index_options(request),
                                  on_plan=on_plan, on_file=on_file, on_audio=on_audio)
    if loader.model is not None and request.saves_text_query:
        save_text_query(loader.model)
    return summary


def index_options(request: IndexRequest) -> dict:
    """The request as `indexer.build_index`'s keyword options, less the model's (which the loader holds)."""
    return dict(model_name=request.model, exclude=request.exclude, batch_size=request.batch_size,
                workers=request.workers, rebuild=request.rebuild, wait=request.wait, prune_empty=request.prune_empty,
                forget=request.forget, commit_every=request.commit_every, forget_exclude=request.forget_exclude)


def save_text_query(model) -> Path | None:
    """Once per model, with onnxruntime installed: the text tower as an ONNX graph, so that later text searches
    run without importing torch (`clapcli.models.onnx_text`); the graph's path, or None. Never fails the index."""
    from ..models.onnx_audio import onnxruntime_available

    if not onnxruntime_available():
        return None
    from ..engine.load import load_model
    from ..models import onnx_text

    try:
        if not onnx_text.can_save(model):
            return None
        if model.precision != "fp32" or model.device.type != "cpu":
            # an int8 (or GPU) index: the graph is fp32 on the CPU, from the text half loaded again
            model = load_model(model.model_ref, "cpu", "fp32", text_only=True, engine="torch")
        return onnx_text.save_text_query(model)
    except Exception as exc:  # noqa: BLE001 - the index is done; searches then load the model as before
        _log.warning("could not save the text query graph: %s", exc)
        return None
