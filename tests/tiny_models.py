"""Tiny random CLAP checkpoints in the official formats, built offline in well under a second each.

- `save_hf_clap(dir, fused)`: a transformers `ClapModel` saved with `save_pretrained`, a RoBERTa-style
  byte-level BPE tokenizer trained here with the `tokenizers` library, and a `preprocessor_config.json`
  like the hub's (frequency_min 50; truncation "fusion" or "rand_trunc").
- BatchNorm running statistics get non-trivial values, so a wrong mel axis or fold changes the output.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "a dog barking in the distance",
    "glass shattering on a hard floor",
    "rain falling on a tin roof",
    "a siren passing by on a busy street",
    "birds chirping in the morning",
    "this is a sound of a cat meowing",
    "the sound of an engine idling",
    "a person speaking quietly",
    "piano chords and soft drums",
    "thunder rumbling far away",
] * 5

# head width 64, as in every released text tower (original checkpoints do not record the head count)
TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, max_position_embeddings=82)
AUDIO = dict(patch_embeds_hidden_size=16, depths=[2, 2, 2, 1], num_attention_heads=[1, 2, 2, 4], hidden_size=128)


def train_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, model_max_length=512)


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=gen) * 2.0 - 20.0 * (n == 64))
            module.running_var.copy_(torch.rand(n, generator=gen) * 30.0 + 5.0)
            module.weight.data.copy_(1.0 + 0.2 * torch.randn(n, generator=gen))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=gen))


def hf_clap(fused: bool, vocab_size: int, seed: int = 0):
    from transformers import ClapConfig, ClapModel

    torch.manual_seed(seed)
    cfg = ClapConfig(
        text_config=dict(TEXT, vocab_size=vocab_size),
        audio_config=dict(AUDIO, enable_fusion=fused),
        projection_dim=24,
    )
    model = ClapModel(cfg).eval()
    randomise_batchnorm(model, seed)
    with torch.no_grad():  # logit scales as trained models have them, not the init
        model.logit_scale_a.fill_(4.2)
        model.logit_scale_t.fill_(3.9)
    return model


# The hub's preprocessor_config.json of laion/clap-htsat-{fused,unfused}, less the truncation mode.
HUB_PREPROCESSOR = dict(
    feature_size=64,
    sampling_rate=48_000,
    fft_window_size=1024,
    hop_length=480,
    max_length_s=10,
    frequency_min=50,
    frequency_max=14_000,
    top_db=None,
    padding="repeatpad",
)


def feature_extractor(fused: bool):
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(**HUB_PREPROCESSOR, truncation="fusion" if fused else "rand_trunc")


def save_hf_clap(directory: Path, fused: bool, seed: int = 0):
    """Write a hub-style CLAP directory; returns (model, tokenizer, feature_extractor)."""
    directory = Path(directory)
    tokenizer = train_tokenizer()
    model = hf_clap(fused, vocab_size=len(tokenizer), seed=seed)
    extractor = feature_extractor(fused)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    extractor.save_pretrained(directory)
    return model, tokenizer, extractor
