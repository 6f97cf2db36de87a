"""What a run starts from: its directory, its model and tokenizer, its data."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from ..data.shards import ShardSplit, resolve_split
from ..errors import DataError, UsageError, first_line
from .state import clear_stale, latest_checkpoint
from .config import TrainConfig
from .runlock import LOCK_FILES


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, ctx) -> Path | None:
    """Create or check RUN_DIR; returns the checkpoint to resume from (None: start fresh).

    A directory holding another run is refused unless `--resume` names the same run (only the options in
    `config.RESUMABLE_CHANGES`, such as --epochs, may differ). The caller holds the run lock (`runlock.py`),
    so what a killed run left can be tidied here."""
    config_file = run_dir / "config.json"
    if config_file.is_file():
        if not cfg.resume:
            raise UsageError(f"{run_dir} already holds a training run; pass --resume to continue it, or choose "
                             "another --out")
        try:
            previous = TrainConfig.from_dict(json.loads(config_file.read_text())["train"])
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"{config_file} is not a clap training config ({exc}); choose another --out") from exc
        changed = cfg.same_run_as(previous)
        if changed:
            raise UsageError(f"{run_dir} holds a different run (differs in: {', '.join(changed)}); resume it with "
                             "the same options, or choose another --out")
        clear_stale(run_dir)
        return latest_checkpoint(run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(p.name not in LOCK_FILES for p in run_dir.iterdir())):
        raise UsageError(f"{run_dir} exists and is not a clap training run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def with_default_model(cfg: TrainConfig) -> TrainConfig:
    """Without --init and --model-config a run adapts the default model, the one every other command loads
    ($CLAP_MODEL, else laion/clap-htsat-fused); config.json then names it, so a resumption adapts the same."""
    from ..models.registry import default_model

    if cfg.init or cfg.model_config:
        return cfg
    return dataclasses.replace(cfg, init=default_model())


def build_model(cfg: TrainConfig, resume_from: str | None):
    """(model, tokenizer, description) from a checkpoint to resume, --init, or a --model-config preset (one of
    the two is set: see `with_default_model`)."""
    from ..models.checkpoints import load_checkpoint

    if cfg.init and cfg.model_config:
        raise UsageError("give one of --init MODEL (adapt a trained model) and --model-config PRESET (a fresh one)")
    if cfg.audio_init and not cfg.model_config:
        raise UsageError("--audio-init initialises the audio encoder of a fresh --model-config model; give "
                         "--model-config PRESET too")
    info = {"init": cfg.init, "preset": cfg.model_config, "text_model": cfg.text_model}
    if resume_from:
        loaded = load_checkpoint(resume_from)
        return loaded.model, loaded.tokenizer, {**info, "source": str(cfg.init or cfg.model_config)}
    if cfg.init:
        loaded = load_checkpoint(cfg.init, tokenizer=cfg.tokenizer)
        return loaded.model, loaded.tokenizer, {**info, "source": loaded.name, "weights": loaded.fingerprint}
    model, tokenizer = fresh_model(cfg.model_config, cfg.text_model, cfg.tokenizer)
    info = {**info, "source": cfg.model_config}
    if cfg.audio_init:
        random_keys = init_audio_encoder(model, cfg.audio_init, cfg.model_config)
        info["audio_init"] = {"path": cfg.audio_init, "random": random_keys}
        if random_keys:
            info["notes"] = [f"--audio-init: {len(random_keys)} fusion tensors (fusion_model, mel_conv2d) are not in "
                             f"{Path(cfg.audio_init).name} and start random"]
    return model, tokenizer, info


def fresh_model(preset_name: str, text_model: str | None, tokenizer_source: str | None):
    """A new model from a preset. The text tower's vocabulary follows the tokenizer; with `text_model` the
    tower's architecture and weights come from that pretrained transformers model."""
    from ..models.checkpoints import load_tokenizer
    from ..models.clap import ClapModel
    from ..models.presets import preset
    from ..models.text import DEFAULT_TOKENIZERS, text_pooling

    cfg = preset(preset_name)
    if cfg.text_tower is not None:  # Wav2CLIP: the text side is a CLIP tower by reference, loaded on first use
        return ClapModel(cfg), None
    pretrained = _pretrained_text_model(text_model) if text_model else None
    if pretrained is not None:
        cfg.text = _text_config(pretrained.config, cfg.text)
        cfg.text.pooling = text_pooling(pretrained, cfg.text)  # recorded, so the saved model says which
    source = tokenizer_source or text_model or DEFAULT_TOKENIZERS.get(cfg.text.model_type)
    if source is None:
        raise UsageError(f"no default tokenizer for a {cfg.text.model_type} text tower; pass --tokenizer")
    tokenizer = load_tokenizer(source, download=True)
    cfg.text.vocab_size = max(cfg.text.vocab_size if pretrained is not None else 0, len(tokenizer))
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None and pretrained is None:
            setattr(cfg.text, name, int(value))
    model = ClapModel(cfg)
    if pretrained is not None:
        missing, unexpected = model.text_model.load_state_dict(pretrained.state_dict(), strict=False)
        real_missing = [k for k in missing if "position_ids" not in k]
        if real_missing or unexpected:
            raise UsageError(f"--text-model {text_model}: its weights do not fit the tower "
                             f"(missing {real_missing[:5]}, unexpected {list(unexpected)[:5]})")
    return model, tokenizer


def _text_config(hf, base):
    """Our TextConfig for a pretrained transformers tower: the fields we name read from its config (through
    its attribute aliases), every other field of its config kept in `extra` so the same architecture is
    rebuilt from our config alone."""
    import dataclasses

    from ..models.config import TextConfig

    names = {f.name for f in dataclasses.fields(TextConfig)} - {"extra", "max_length", "pooling"}
    values = {k: getattr(hf, k) for k in names if hasattr(hf, k)}
    if hf.model_type == "clip_text_model" and hasattr(hf, "dropout"):
        values.update(hidden_dropout_prob=hf.dropout, attention_probs_dropout_prob=hf.attention_dropout)
    internal = {"architectures", "transformers_version", "torch_dtype", "dtype", "model_type", "auto_map",
                "id2label", "label2id", "output_attentions", "output_hidden_states", "return_dict"}
    extra = {k: v for k, v in hf.to_dict().items() if k not in names and k not in internal and not k.startswith("_")}
    return TextConfig(**values, max_length=min(base.max_length, int(values.get("max_position_embeddings") or 77)),
                      extra=extra)


def _pretrained_text_model(name: str):
    """The pretrained tower of a transformers model (a CLIP checkpoint gives its text half + projection)."""
    from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection

    from ..errors import CheckpointError
    from ..models.pretrained import from_pretrained

    what = "--text-model"
    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type == "clip":  # a full CLIP: its text half, with the projection width of the whole
            text_config = config.text_config
            text_config.projection_dim = config.projection_dim
            return from_pretrained(CLIPTextModelWithProjection, name, what, config=text_config)
        if config.model_type == "clip_text_model":
            return from_pretrained(CLIPTextModelWithProjection, name, what)
        try:
            return from_pretrained(AutoModel, name, what, add_pooling_layer=True)
        except TypeError:  # towers without a pooling option
            return from_pretrained(AutoModel, name, what)
    except CheckpointError:
        raise
    except Exception as exc:
        raise UsageError(f"--text-model {name}: cannot load it ({first_line(exc)}); give a local "
                         "directory or a model in the Hugging Face cache") from exc


AUDIO_INIT_FUSION = re.compile(r"(^|\.)(fusion_model|mel_conv2d)\.")  # layers AudioSet-pretrained weights lack


def init_audio_encoder(model, path: str, preset_name: str) -> list[str]:
    """Load AudioSet-pretrained weights into the audio encoder: a PANN `Cnn14*.pth` ({"model": state}), a
    Lightning checkpoint of the PANN/HTSAT code bases ({"state_dict": {"sed_model.…"}}), or a LAION-CLAP
    checkpoint's `audio_branch.` (DDP `module.` prefixes stripped). Strict, except the fusion layers the
    AudioSet weights cannot have; returns those (left at their random init)."""
    import torch

    from ..models.checkpoints import convert_laion_state_dict
    from ..models.weights import DERIVED_KEY, safe_torch_load, state_dict_diff

    source = Path(path).expanduser()
    if not source.is_file():
        raise UsageError(f"--audio-init {path}: no such file")
    raw = safe_torch_load(source)
    state = raw
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--audio-init {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for prefix in ("sed_model.", "audio_branch."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    enc = "audio_model.audio_encoder."
    converted = convert_laion_state_dict({"audio_branch." + k: v for k, v in state.items()})
    given = {k[len(enc) :]: v for k, v in converted.items() if k.startswith(enc) and not DERIVED_KEY.search(k)}
    encoder = model.audio_model.audio_encoder
    expected = {k: v for k, v in encoder.state_dict().items() if not DERIVED_KEY.search(k)}
    left_random = sorted(k for k in expected if k not in given and AUDIO_INIT_FUSION.search(k))
    diff = state_dict_diff({k: v for k, v in expected.items() if k not in left_random}, given)
    if diff:
        rows = "; ".join(line.strip() for line in diff.splitlines())
        raise UsageError(f"--audio-init {path} does not fit the {model.config.audio.encoder} audio encoder of "
                         f"--model-config {preset_name}: {rows}")
    encoder.load_state_dict(given, strict=False)  # strict in effect: the diff is empty but for the fusion layers
    return left_random


def open_data(cfg: TrainConfig) -> tuple[ShardSplit, ShardSplit | None]:
    """The training split and the validation split (--val, else the data folder's val/ split, else none)."""
    split = resolve_split(cfg.data)
    val_source = cfg.val or split.val_dir
    val = resolve_split(val_source) if val_source else None
    if val is not None and val.num_samples == 0:
        raise DataError(f"the validation data {val_source} holds no samples")
    return split, val


def open_zeroshot(cfg: TrainConfig):
    """(clips, candidate labels) for zero-shot validation, or None; every clip's class must be a candidate."""
    if not cfg.val_zeroshot:
        if cfg.labels:
            raise UsageError("--labels is for --val-zeroshot; give the labelled clips too")
        return None
    from ..tagging.labels import resolve_labels
    from ..tagging.prompts import check_templates
    from ..data.labelled import read_labelled

    check_templates([cfg.template])
    clips = read_labelled(cfg.val_zeroshot)
    labels = resolve_labels(cfg.labels).labels if cfg.labels else sorted({c.label for c in clips})
    unknown = sorted({c.label for c in clips} - set(labels))
    if unknown:
        raise UsageError(f"--val-zeroshot classes not in --labels: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return clips, labels
