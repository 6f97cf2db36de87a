"""The frozen CLIP image teacher of Wav2CLIP distillation (`clap train --objective wav2clip --teacher CLIP_DIR`).

CLIP_DIR is a transformers CLIP directory or hub id with a vision tower: a full `CLIPModel` (its vision tower
and `visual_projection` are used, at the model's top-level `projection_dim`) or a `CLIPVisionModelWithProjection`.
Its image processor (`preprocessor_config.json`: resize of the shortest edge, centre crop, rescale, normalise)
prepares the frames; that part is plain CPU work and runs in the data workers (`preprocess`), the tower runs
in the training process on the training device (`embed`), always in eval mode and without gradient.

Samples carrying a precomputed embedding (`KEY.npy`) never reach the teacher: they are used as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import CheckpointError, UsageError, first_line

VISION_TYPES = ("clip", "clip_vision_model")


def resolve_teacher(source: str) -> Path:
    """A local directory for `source`: the directory itself, or the hub snapshot (cache first)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or source.startswith((".", "/", "~")):
        raise UsageError(f"--teacher {source}: not a CLIP model directory")
    from ..errors import WeightsNotAvailable
    from ..models import registry

    try:
        return Path(registry.fetch(source, download=True))
    except WeightsNotAvailable as exc:
        raise WeightsNotAvailable(f"--teacher {source} is not in the Hugging Face cache and cannot be downloaded "
                                  f"here; run `clap models pull {source}` on a connected machine, or pass "
                                  "--teacher PATH to a local copy") from exc


def _vision_config(directory: Path, source: str):
    """The vision tower's config, its projection width set to the model's joint width (a `CLIPConfig` keeps the
    real `projection_dim` at its top level; its `vision_config` carries a default)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory))
    except Exception as exc:
        raise CheckpointError(f"--teacher {source}: cannot read its config ({first_line(exc)})") from exc
    kind = getattr(config, "model_type", None)
    if kind not in VISION_TYPES:
        raise UsageError(f"--teacher {source} is a {kind!r} model without a CLIP vision tower; give a CLIP "
                         "model (e.g. openai/clip-vit-base-patch32) or a CLIPVisionModelWithProjection directory")
    if kind == "clip":
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        return vision
    return config


def _image_processor(directory: Path, source: str):
    try:  # transformers 5: the PIL implementation (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL implementation
        from transformers import CLIPImageProcessor as Processor
    if not (directory / "preprocessor_config.json").is_file():
        raise CheckpointError(f"--teacher {source} has no preprocessor_config.json (its image preprocessing)")
    return Processor.from_pretrained(str(directory))


class FramePreprocessor:
    """Decoded RGB frames → pixel values (P, 3, H, W), exactly as the teacher's image processor prepares
    them. Picklable and light: the data workers hold one."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, frames: Sequence) -> torch.Tensor:
        return self.processor(images=list(frames), return_tensors="pt")["pixel_values"].float()


class ImageTeacher:
    """A frozen CLIP vision tower with its projection: pixel values → image_embeds (P, D)."""

    def __init__(self, source: str, device: torch.device | str = "cpu"):
        from transformers import CLIPVisionModelWithProjection
        from transformers.utils import logging as hf_logging

        from ..models.pretrained import from_pretrained

        self.source = source
        directory = resolve_teacher(source)
        config = _vision_config(directory, source)
        self.preprocess = FramePreprocessor(_image_processor(directory, source))
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            model, info = from_pretrained(CLIPVisionModelWithProjection, str(directory), "--teacher",
                                          config=config, output_loading_info=True)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"--teacher {source}: cannot load its vision tower "
                                  f"({first_line(exc)})") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
            hf_logging.enable_progress_bar()
        missing = [k for k in info.get("missing_keys", []) if "position_ids" not in k]
        if missing or info.get("mismatched_keys"):
            raise CheckpointError(f"--teacher {source}: its weights do not hold the whole vision tower (missing "
                                  f"{missing[:3]}, mismatched {list(info.get('mismatched_keys') or [])[:3]})")
        self.model = model.to(device).eval().requires_grad_(False)
        self.dim = int(config.projection_dim)  # D of image_embeds

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(P, 3, H, W) pixel values → (P, D) float32 image embeddings (not normalised; the loss normalises)."""
        if pixel_values.shape[0] == 0:
            return torch.zeros(0, self.dim, device=self.device)
        pixels = pixel_values.to(self.device, torch.float32)
        return self.model(pixel_values=pixels).image_embeds.float()

    def embed_frames(self, frames: Sequence, batch_size: int = 32) -> torch.Tensor:
        """Decoded RGB frames → (P, D) float32 image embeddings, on the teacher's device."""
        parts = [self.embed(self.preprocess(frames[i : i + batch_size])) for i in range(0, len(frames), batch_size)]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, device=self.device)
