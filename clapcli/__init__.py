"""clap: tag and search audio with contrastive language-audio models."""

from .version import __version__


def load_model(name_or_path=None, device="auto", precision="auto", tokenizer=None, text_only=False, engine=None):
    """Load a CLAP model (hub id, local directory or .pt file); see `clapcli.engine.load.load_model`.

    Defined here so `import clapcli` stays light: torch loads on the first call."""
    from .engine.load import load_model as _load

    return _load(name_or_path, device=device, precision=precision, tokenizer=tokenizer, text_only=text_only,
                 engine=engine)


def load_classifier(directory, model=None, device="auto", precision="auto", engine=None):
    """Load a classifier written by `clap finetune`; see `clapcli.engine.load.load_classifier`. The result scores
    audio files (`classify_files`) or raw embeddings (`probabilities`)."""
    from .engine.load import load_classifier as _load

    return _load(directory, model=model, device=device, precision=precision, engine=engine)


__all__ = ["load_model", "load_classifier", "__version__"]
