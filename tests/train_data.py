"""A learnable toy data set for the training tests: four kinds of sound, each with paraphrased captions.

The kinds differ where a mel spectrogram sees it (a low hum, a high whistle, broadband hiss, a click train),
with random pitch, level, length and phase per clip, so a model has to learn the kind, not the file. A
word-level tokenizer trained on the captions keeps the whole thing offline.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16_000  # written at 16 kHz: `clap shards make` resamples to 48 kHz like any other source

CAPTIONS = {
    "hum": ["a low humming drone", "deep bass hum", "a low rumble humming", "the drone of a low hum"],
    "whistle": ["a high pitched whistle", "a shrill high tone", "high whistling beep", "the whistle of a high tone"],
    "hiss": ["static hiss noise", "white noise hissing", "a hissing static sound", "the hiss of static noise"],
    "clicks": ["fast ticking clicks", "a clock ticking quickly", "rapid clicking ticks", "the ticks of fast clicks"],
}
KINDS = list(CAPTIONS)


def clip(kind: str, rng: np.random.Generator) -> np.ndarray:
    seconds = float(rng.uniform(0.8, 1.6))
    t = np.arange(int(seconds * SR)) / SR
    if kind == "hum":
        f0 = rng.uniform(90, 160)
        x = sum(np.sin(2 * np.pi * h * f0 * t + rng.uniform(0, 6)) / h for h in (1, 2, 3))
    elif kind == "whistle":
        x = np.sin(2 * np.pi * rng.uniform(3_000, 5_000) * t + rng.uniform(0, 6))
    elif kind == "hiss":
        x = rng.standard_normal(len(t))
    else:
        x = np.zeros(len(t))
        period = int(SR / rng.uniform(6, 12))
        for start in range(int(rng.integers(0, period)), len(t), period):
            x[start : start + 40] = rng.standard_normal(min(40, len(t) - start))
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.3, 0.8)
    return x.astype(np.float32)


def make_dataset(root: Path, per_kind: int = 24, seed: int = 0) -> Path:
    """Write `root/audio/*.wav` and `root/manifest.csv` (path, caption as a JSON list, tags); returns the CSV."""
    rng = np.random.default_rng(seed)
    audio = root / "audio"
    audio.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(per_kind):
        for kind in KINDS:
            name = f"{kind}_{i:03d}.wav"
            sf.write(audio / name, clip(kind, rng), SR, subtype="PCM_16")
            captions = list(rng.choice(CAPTIONS[kind], size=2, replace=False))
            rows.append({"path": f"audio/{name}", "caption": json.dumps(captions), "tags": kind})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "caption", "tags"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def make_tokenizer(directory: Path) -> Path:
    """A RoBERTa-style BPE tokenizer trained on the captions, saved to `directory`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    corpus = [c for caps in CAPTIONS.values() for c in caps]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 3, vocab_size=300, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tok = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=512)
    tok.save_pretrained(str(directory))
    return directory


def kind_of(path: str) -> str:
    return Path(path).name.split("_")[0]
