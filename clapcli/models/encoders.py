"""The audio encoder factory: `AudioConfig.encoder` names the kind, the kind's class builds it.

Each encoder class takes an `AudioConfig` and maps mel features (B, C, T, F) and `is_longer` (B,) to pooled
features (B, out_width); `AudioConfig.out_width` is the one formula for that width (the audio projection's
input), from the config alone. "htsat" (every released checkpoint), "cnn14" (PANN CNN14) and "resnet18"
(Wav2CLIP) live here; a new encoder registers here and writes its width formula in config.py.
"""

from __future__ import annotations

from torch import nn

from ..errors import ClapError
from .config import AudioConfig
from .htsat import HTSAT
from .pann import Cnn14
from .resnet import ResNet18

AUDIO_ENCODERS: dict[str, type[nn.Module]] = {
    "htsat": HTSAT,
    "cnn14": Cnn14,  # PANN CNN14
    "resnet18": ResNet18,  # Wav2CLIP
}


def _encoder_class(name: str) -> type[nn.Module]:
    try:
        return AUDIO_ENCODERS[name]
    except KeyError:
        raise ClapError(
            f"unknown audio encoder {name!r}; choose one of: {', '.join(sorted(AUDIO_ENCODERS))}"
        ) from None


def build_audio_encoder(cfg: AudioConfig) -> nn.Module:
    """The encoder `cfg.encoder` names, with random weights; its `out_width` is its output width."""
    return _encoder_class(cfg.encoder)(cfg)

