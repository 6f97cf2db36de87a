"""What a run starts from: its directory, its model and tokenizer, its data."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, UsageError
from .checkpoint import clear_stale, latest_checkpoint
from .config import TrainConfig
from .shards import ShardSplit, resolve_split


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, ctx) -> Path | None:
    """Create or check RUN_DIR; returns the checkpoint to resume from (None: start fresh).

    A directory holding another run is refused unless `--resume` names the same run (only the options in
    `config.RESUMABLE_CHANGES`, such as --epochs, may differ)."""
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
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UsageError(f"{run_dir} exists and is not a clap training run; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return None


def build_model(cfg: TrainConfig, resume_from: str | None):
    """(model, tokenizer, description) from a checkpoint to resume, --init, or a --model-config preset."""
    from ..models.checkpoints import load_checkpoint

    if cfg.init and cfg.model_config:
        raise UsageError("give one of --init MODEL (adapt a trained model) and --model-config PRESET (a fresh one)")
    info = {"init": cfg.init, "preset": cfg.model_config, "text_model": cfg.text_model}
    if resume_from:
        loaded = load_checkpoint(resume_from)
        return loaded.model, loaded.tokenizer, {**info, "source": str(cfg.init or cfg.model_config)}
    if cfg.init:
        loaded = load_checkpoint(cfg.init, tokenizer=cfg.tokenizer)
        return loaded.model, loaded.tokenizer, {**info, "source": loaded.name, "weights": loaded.fingerprint}
    if not cfg.model_config:
        raise UsageError("nothing to train: give --init MODEL (adapt a trained model) or --model-config PRESET "
                         "(a fresh model; `clap models presets` lists them)")
    model, tokenizer = fresh_model(cfg.model_config, cfg.text_model, cfg.tokenizer)
    return model, tokenizer, {**info, "source": cfg.model_config}


def fresh_model(preset_name: str, text_model: str | None, tokenizer_source: str | None):
    """A new model from a preset. The text tower's vocabulary follows the tokenizer; with `text_model` the
    tower's architecture and weights come from that pretrained transformers model."""
    from ..models.checkpoints import load_tokenizer
    from ..models.clap import ClapModel
    from ..models.presets import preset

    cfg = preset(preset_name)
    if cfg.text_tower is not None:  # Wav2CLIP: the text side is a CLIP tower by reference, loaded on first use
        return ClapModel(cfg), None
    source = tokenizer_source or text_model or _default_tokenizer(cfg.text.model_type)
    tokenizer = load_tokenizer(source, download=True)
    pretrained = None
    if text_model:
        pretrained = _pretrained_text_model(text_model)
        cfg.text = _text_config(pretrained.config, cfg.text)
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
    """Our TextConfig for a pretrained transformers tower (its own fields; ours keep their defaults)."""
    import dataclasses

    from ..models.config import TextConfig

    names = {f.name for f in dataclasses.fields(TextConfig)} - {"extra", "max_length"}
    values = {k: v for k, v in hf.to_dict().items() if k in names}
    return TextConfig(**values, max_length=base.max_length)


def _default_tokenizer(model_type: str) -> str:
    from ..models.registry import ROBERTA_TOKENIZER

    return ROBERTA_TOKENIZER if model_type == "roberta" else "bert-base-uncased"


def _pretrained_text_model(name: str):
    from transformers import AutoModel

    try:
        return AutoModel.from_pretrained(name, add_pooling_layer=True)
    except TypeError:  # towers without a pooling option (CLIP text)
        return AutoModel.from_pretrained(name)
    except Exception as exc:
        raise UsageError(f"--text-model {name}: cannot load it ({str(exc).splitlines()[0]}); give a local "
                         "directory or a model in the Hugging Face cache") from exc


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
    from .labelled import read_labelled

    check_templates([cfg.template])
    clips = read_labelled(cfg.val_zeroshot)
    labels = resolve_labels(cfg.labels).labels if cfg.labels else sorted({c.label for c in clips})
    unknown = sorted({c.label for c in clips} - set(labels))
    if unknown:
        raise UsageError(f"--val-zeroshot classes not in --labels: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return clips, labels
