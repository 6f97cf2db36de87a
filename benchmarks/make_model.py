"""Build a full-size fused CLAP with random weights, saved as a hub-style directory.

    python -m benchmarks.make_model                       # -> benchmarks/_work/model-fused

The architecture is transformers' default `ClapConfig` with `enable_fusion=True`: HTSAT-tiny audio
tower (96 wide, depths 2-2-6-2) with attentional feature fusion + RoBERTa-base text tower, projection
512, i.e. the architecture of laion/clap-htsat-fused (~153 M parameters). Weights are transformers'
random initialisation; only speed is measured with it, so that is fine.

The directory holds what the hub repository holds: `config.json` + `model.safetensors`
(`save_pretrained`), a RoBERTa-style byte-level BPE tokenizer (trained offline on a small corpus by
`tests.tiny_models.train_tokenizer`, so its vocabulary is ~400 tokens while the model keeps 50265 rows:
every token id is valid, text embeddings are meaningless, text timing is realistic) and a
`preprocessor_config.json` equal to the hub's (frequency_min 50, truncation "fusion", padding
"repeatpad", top_db None).

BatchNorm statistics are made plausible: the mel BatchNorm (`bn0`, 64 bands) gets the per-band mean and
variance of the log-mel of a synthesised clip, the fusion BatchNorms random but non-trivial values, so
the normalised input has the scale a trained model sees. Logit scales are set as in trained models.

Cached: a `bench_model.json` stamp records the parameters; a matching directory is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from ._common import MODEL_DIR

STAMP = "bench_model.json"
BUILDER_VERSION = 1  # bump when the saved model changes


def plausible_batchnorm(model, extractor, seed: int) -> None:
    """Set BatchNorm running statistics (and affine params) to values a trained model could have."""
    import numpy as np
    import torch

    from tests.audio_synth import tone_noise

    gen = torch.Generator().manual_seed(seed)
    wave = tone_noise(10.0, 48_000, 1, seed=seed)  # (480000,)
    mel = extractor(wave, sampling_rate=48_000, return_tensors="np")["input_features"][0, 0]  # (1001, 64) dB
    band_mean = torch.from_numpy(np.asarray(mel.mean(axis=0), dtype=np.float32))  # (64,)
    band_var = torch.from_numpy(np.asarray(mel.var(axis=0), dtype=np.float32)).clamp_min(1.0)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.BatchNorm2d):
            continue
        n = module.num_features
        if n == band_mean.numel() and name.endswith("bn0"):
            module.running_mean.copy_(band_mean)
            module.running_var.copy_(band_var)
        else:
            module.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
            module.running_var.copy_(torch.rand(n, generator=gen) * 2.0 + 0.5)
        module.weight.data.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
        module.bias.data.copy_(0.2 * torch.randn(n, generator=gen))


def make_model(directory: Path = MODEL_DIR, seed: int = 0, quiet: bool = False) -> Path:
    directory = Path(directory)
    params = dict(seed=seed, version=BUILDER_VERSION, architecture="ClapConfig(audio_config=dict(enable_fusion=True))")
    try:
        if json.loads((directory / STAMP).read_text()) == params and (directory / "model.safetensors").is_file():
            if not quiet:
                print(f"model {directory}: already there (stamp matches), nothing to do")
            return directory
    except (OSError, ValueError):
        pass

    import torch
    from transformers import ClapConfig, ClapModel

    from tests.tiny_models import feature_extractor, train_tokenizer

    start = time.perf_counter()
    if directory.exists():
        shutil.rmtree(directory)
    torch.manual_seed(seed)
    model = ClapModel(ClapConfig(audio_config=dict(enable_fusion=True))).eval()
    extractor = feature_extractor(fused=True)
    plausible_batchnorm(model, extractor, seed)
    with torch.no_grad():  # logit scales as the released checkpoints have them, not the init value
        model.logit_scale_a.fill_(4.2)
        model.logit_scale_t.fill_(3.9)
    model.save_pretrained(directory)
    train_tokenizer().save_pretrained(directory)
    extractor.save_pretrained(directory)
    (directory / STAMP).write_text(json.dumps(params) + "\n")
    if not quiet:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {directory}: {n_params / 1e6:.1f} M parameters, written in {time.perf_counter() - start:.1f} s")
    return directory


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=MODEL_DIR, help=f"directory (default {MODEL_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    make_model(args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
