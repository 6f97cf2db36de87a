"""Fidelity and batch drift of each precision, on full-size random models of every encoder family.

    python -m benchmarks.bench_precision                    # all families, fp32 bf16 int8 (+ onnx for HTSAT)
    python -m benchmarks.bench_precision --families htsat-fused --clips 6

What `--precision auto` may pick is decided here (the rule in `clapcli/runtime.py`): every output within
cosine 0.9999 of fp32 and a file's vector independent of its batch mates within 1e-5. Tiny random models
are not representative of the numerics (few, narrow layers), so each family is built at full size with
random weights, in the project's own format:

    htsat-fused   HTSAT-tiny with feature fusion + RoBERTa-base (laion/clap-htsat-fused's architecture)
    htsat         HTSAT-tiny without fusion (laion/clap-htsat-unfused)
    pann          PANN CNN14 + RoBERTa-base (LAION's PANN-14)
    wav2clip      Wav2CLIP's ResNet-18 on the 16 kHz linear front end (audio only)
    bert, clip    the BERT-base and CLIP ViT-B/32 text towers (text only)

BatchNorm statistics are measured on the clips themselves (train-mode pass, then eval), so activations have
the scale a trained model sees; random statistics would saturate the ReLUs and make every clip alike.

Each configuration (precision/engine) embeds the same files twice: (A) in order in batches of 8, (B) in
reverse order in batches of 3, so every file has other batch mates and another position. Reported per
configuration, for file embeddings and for the 10 s window embeddings of long files (and for texts, batches
of 16 against one at a time, which also changes the padding):
- min cosine to fp32/torch in (A), the fidelity;
- batch drift: the largest absolute difference of one vector between (A) and (B) of the same configuration.
Results go to benchmarks/_work/results/precision-<time>.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from . import _common as C

FAMILIES = {  # name: (preset, what is measured)
    "htsat-fused": ("htsat-tiny-fused", "audio+text"),
    "htsat": ("htsat-tiny", "audio"),
    "pann": ("pann14-roberta", "audio"),
    "wav2clip": ("wav2clip", "audio"),
    "bert": ("htsat-tiny-fused-bert", "text"),
    "clip": ("htsat-tiny-fused-clip", "text"),
}
BUILDER_VERSION = 1
CLIP_SECONDS = [0.7, 2.5, 4.0, 7.5, 10.0, 12.0, 17.0, 25.0, 33.0, 48.0]  # short, exactly 10 s, long (fused path)
TEXTS = ["a dog barks twice", "rain on a tin roof", "glass shattering on a concrete floor", "applause",
         "an old diesel engine idling in the cold, then revving up", "birdsong at dawn", "a door creaks",
         "footsteps on gravel", "a kettle whistles", "a crowd cheering in a stadium", "thunder", "typing",
         "a cello playing a slow melody in a large hall", "sirens passing by", "waves", "a cat meows"]


def tokenizer_for(family: str):
    """A small tokenizer of the tower's kind trained on TEXTS (the towers keep their full vocab size: every id
    is valid, and only the numerics of the tower are measured)."""
    from tests.tiny_models import train_tokenizer

    if family not in ("bert", "clip"):
        return train_tokenizer()
    from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=specials))
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=300, min_frequency=1, special_tokens=["<|startoftext|>", "<|endoftext|>"])
    backend = bpe._tokenizer
    sot, eot = backend.token_to_id("<|startoftext|>"), backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                           special_tokens=[("<|startoftext|>", sot),
                                                                           ("<|endoftext|>", eot)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=77)


def calibrate_batchnorm(m, paths: list[str]) -> None:
    """Running statistics of every BatchNorm measured on the clips' features (one train-mode pass)."""
    import torch

    encoder = m.model.audio_model if hasattr(m.model, "audio_model") else m.model
    bns = [x for x in encoder.modules() if isinstance(x, torch.nn.modules.batchnorm._BatchNorm)]
    gen = torch.Generator().manual_seed(0)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the pass
        bn.weight.data.copy_(1.0 + 0.2 * torch.randn(bn.num_features, generator=gen))
        bn.bias.data.copy_(0.2 * torch.randn(bn.num_features, generator=gen))
    from clapcli.audio.loader import decode_one

    waves = [decode_one(p, m.config.frontend.sample_rate, quantize=True).samples for p in paths]
    if not m.fused:  # an unfused model takes one clip at a time: calibrate on each file's first
        waves = [w[: m.config.frontend.clip_samples] for w in waves]
    x, longer = m.features.clip_features(waves)
    encoder.train()
    with torch.no_grad():
        m.model.encode_audio(x, longer)
    encoder.eval()


def build(family: str, directory: Path, paths: list[str]) -> Path:
    """The full-size random model of `family` in the own format (cached by a stamp)."""
    import json

    import torch

    from clapcli.engine.load import load_model
    from clapcli.models.checkpoints import save_own
    from clapcli.models.clap import ClapModel
    from clapcli.models.presets import preset

    stamp = {"family": family, "version": BUILDER_VERSION, "calibrated_on": [Path(p).name for p in paths]}
    try:
        if json.loads((directory / "bench_stamp.json").read_text()) == stamp:
            return directory
    except (OSError, ValueError):
        pass
    cfg = preset(FAMILIES[family][0])
    tokenizer = None
    if family == "wav2clip":
        cfg.text_tower = "openai/clip-vit-base-patch32"  # a reference only: never loaded (audio is measured)
    else:
        tokenizer = tokenizer_for(family)
        cfg.text.vocab_size = max(cfg.text.vocab_size, len(tokenizer))
    torch.manual_seed(0)
    model = ClapModel(cfg).eval()
    with torch.no_grad():
        for name in ("logit_scale_a", "logit_scale_t"):
            if hasattr(model, name):
                getattr(model, name).fill_(4.2)
    save_own(model, tokenizer, directory)
    if "audio" in FAMILIES[family][1]:
        m = load_model(str(directory), device="cpu", precision="fp32", engine="torch")
        calibrate_batchnorm(m, paths)
        save_own(m.model, tokenizer, directory)
    (directory / "bench_stamp.json").write_text(json.dumps(stamp) + "\n")
    return directory


def make_clips(directory: Path) -> list[str]:
    from tests.audio_synth import tone_noise, write_audio

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, seconds in enumerate(CLIP_SECONDS):
        p = directory / f"clip{i:02d}-{seconds:g}s.wav"
        if not p.exists():
            write_audio(p, tone_noise(seconds, 44_100, channels=1 + i % 2, seed=100 + i), 44_100)
        paths.append(str(p))
    return paths


def embed_audio(m, paths: list[str], batch_size: int, reverse: bool) -> dict[str, np.ndarray]:
    """{"PATH": file vector, "PATH@t0": window vector} for every file and 10 s window."""
    order = list(reversed(paths)) if reverse else list(paths)
    out = {}
    for r in m.embed_files(order, batch_size=batch_size, segments=True):
        assert r.error is None, (r.path, r.error)
        out[r.path] = r.embedding
        for s in r.segments:
            out[f"{r.path}@{s.start:.2f}"] = s.embedding
    return out


def embed_texts(m, texts: list[str], alone: bool) -> dict[str, np.ndarray]:
    if alone:
        return {t: m.embed_text([t])[0] for t in texts}
    return dict(zip(texts, m.embed_text(texts, batch_size=16)))


def compare(ref: dict, a: dict, b: dict) -> dict:
    """min cosine of `a` to `ref` and the largest |a - b| of one vector, split into files/windows/texts."""
    out = {}
    for kind, keys in (("file", [k for k in ref if "@" not in k]), ("window", [k for k in ref if "@" in k])):
        if not keys:
            continue
        cos = [float(np.dot(ref[k], a[k]) / (np.linalg.norm(ref[k]) * np.linalg.norm(a[k]))) for k in keys]
        drift = [float(np.abs(a[k] - b[k]).max()) for k in keys]
        out[kind] = {"n": len(keys), "min_cosine": min(cos), "batch_drift": max(drift)}
    return out


def configurations(family: str, wanted: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in wanted:
        precision, _, engine = item.partition("/")
        engine = engine or "torch"
        if engine == "onnx" and not family.startswith("htsat"):
            continue  # the onnx engine runs HTSAT encoders only
        out.append((precision, engine))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated, of: " + ", ".join(FAMILIES))
    ap.add_argument("--configs", default="fp32/torch,fp32/onnx,bf16/torch,int8/torch,int8/onnx",
                    help="precision/engine pairs; fp32/torch is the reference and is always measured")
    ap.add_argument("--clips", type=int, default=len(CLIP_SECONDS), help="use the first N clips")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from clapcli.engine.load import load_model

    info = C.machine_info()
    info["flags"] = sorted(f for f in C.cpu_flags() if f.startswith(("avx", "amx", "fma")))
    C.print_machine(info)
    clips = make_clips(C.WORK / "precision-clips")[: args.clips]
    wanted = [c for c in args.configs.split(",") if c and c != "fp32/torch"]
    results, rows = {}, []
    for family in args.families.split(","):
        what = FAMILIES[family][1]
        start = time.perf_counter()
        directory = build(family, C.WORK / f"precision-model-{family}", clips)
        print(f"{family}: model ready in {time.perf_counter() - start:.0f} s", flush=True)
        per = {}
        for precision, engine in [("fp32", "torch")] + configurations(family, wanted):
            start = time.perf_counter()
            m = load_model(str(directory), device="cpu", precision=precision, engine=engine,
                           text_only=what == "text")
            got = {}
            if "audio" in what:
                got["A"] = embed_audio(m, clips, 8, reverse=False)
                got["B"] = embed_audio(m, clips, 3, reverse=True)
            if "text" in what:
                got.setdefault("A", {}).update(embed_texts(m, TEXTS, alone=False))
                got.setdefault("B", {}).update(embed_texts(m, TEXTS, alone=True))
            per[f"{precision}/{engine}"] = got
            ref = per["fp32/torch"]["A"]
            text_keys = set(TEXTS) if "text" in what else set()
            audio_ref = {k: v for k, v in ref.items() if k not in text_keys}
            summary = compare(audio_ref, got["A"], got["B"]) if audio_ref else {}
            if text_keys:
                summary["text"] = compare({k: ref[k] for k in text_keys}, got["A"], got["B"])["file"]
            seconds = time.perf_counter() - start
            results.setdefault(family, {})[f"{precision}/{engine}"] = {**summary, "seconds": round(seconds, 1)}
            for kind, s in summary.items():
                rows.append([family, f"{precision}/{engine}", kind, s["n"], f"{s['min_cosine']:.6f}",
                             f"{s['batch_drift']:.1e}"])
                print(f"  {precision}/{engine} {kind}: n={s['n']} min cosine {s['min_cosine']:.6f} "
                      f"batch drift {s['batch_drift']:.1e}", flush=True)
            del m
    print()
    print(C.markdown_table(["family", "precision/engine", "vectors", "n", "min cosine to fp32", "batch drift"],
                           rows))
    path = C.write_result("precision", {"machine": info, "clips_seconds": CLIP_SECONDS[: args.clips],
                                        "results": results})
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
