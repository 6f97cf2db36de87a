"""clap: tag and search audio with contrastive language-audio models."""

__version__ = "0.1.0"


def load_model(name_or_path=None, device="auto", precision="auto", tokenizer=None):
    """Load a CLAP model (hub id, local directory or .pt file); see `clapcli.api.load_model`.

    Defined here so `import clapcli` stays light: torch loads on the first call."""
    from .api import load_model as _load

    return _load(name_or_path, device=device, precision=precision, tokenizer=tokenizer)


__all__ = ["load_model", "__version__"]
