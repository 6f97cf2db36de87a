"""Audio front end: decoding to 48 kHz mono, log-mel spectrograms and model-ready feature stacks.

Names are resolved lazily so that importing `clapcli.audio` (or `clapcli.audio.decode`) does not import
torch; the mel front end and feature builder load it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "AudioInfo": "decode",
    "load_audio": "decode",
    "probe": "decode",
    "read_mono": "decode",
    "quantize_int16": "decode",
    "to_model_rate": "decode",
    "MelFrontEnd": "frontend",
    "mel_filter_bank": "frontend",
    "FeatureBuilder": "features",
    "build_fusion_input": "features",
    "fusion_crop_starts": "features",
    "repeat_pad": "features",
    "window_starts": "features",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .decode import AudioInfo, load_audio, probe, quantize_int16, to_model_rate
    from .features import FeatureBuilder, build_fusion_input, fusion_crop_starts, repeat_pad, window_starts
    from .frontend import MelFrontEnd, mel_filter_bank


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
