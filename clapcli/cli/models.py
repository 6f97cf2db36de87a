"""`clap models list|pull`: the known released models and the local cache."""

from __future__ import annotations

import typer

from . import output

models_app = typer.Typer(help="List and download released CLAP models; list training presets.",
                         no_args_is_help=True)


@models_app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Known models: name, architecture, fused, embedding dim, and whether the weights are cached."""
    from ..models.registry import DEFAULT_MODEL, KNOWN_MODELS, is_cached

    rows = [
        {"name": m.name, "architecture": m.architecture, "fused": m.fused, "dim": m.dim,
         "cached": is_cached(m.name), "default": m.name == DEFAULT_MODEL, "note": m.note}
        for m in KNOWN_MODELS.values()
    ]
    if as_json or not output.is_terminal():
        _show(rows, True, "", (), None)
        return
    output.stdout_console().print(models_table(rows))


def models_table(rows: list[dict]):
    """The `models list` table, readable at 80 columns: names are never cut (the name column is as wide as
    the longest), and each note goes on a dimmed line under its name instead of a column of its own."""
    from rich.table import Table

    table = Table(title="CLAP models", show_edge=False)
    table.add_column("name", min_width=max(len(r["name"]) for r in rows), overflow="fold")
    for col in ("encoder", "fused", "dim", "cached"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        note = r["note"] or ""
        if r["default"] and "default" not in note:
            note = "default" + (f"; {note}" if note else "")
        name = output.literal(r["name"]) + (f"\n[dim]{output.literal(note)}[/]" if note else "")
        table.add_row(name, r["architecture"], "yes" if r["fused"] else "no", str(r["dim"]),
                      "[green]yes[/]" if r["cached"] else "no")
    return table


@models_app.command("pull")
def pull(name: str = typer.Argument(..., metavar="NAME", help="A name from `clap models list` or any hub id.")) -> None:
    """Download a model's weights into the Hugging Face cache (needs network)."""
    from ..models.registry import ROBERTA_TOKENIZER, fetch, lookup

    path = fetch(name, download=True)
    known = lookup(name)
    if known is not None and known.text_tower:  # Wav2CLIP: its CLIP text tower, loaded on first text use
        from huggingface_hub import snapshot_download

        snapshot_download(known.text_tower, allow_patterns=["*.json", "*.safetensors", "*.txt"])
    elif known is not None and known.filename:  # original .pt files carry no tokenizer
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(ROBERTA_TOKENIZER)
    output.stderr_console().print(f"{output.literal(name)}: cached at {output.literal(path)}", highlight=False,
                                  soft_wrap=True)


@models_app.command("presets")
def presets(as_json: bool = typer.Option(False, "--json", help="One JSON object per line.")) -> None:
    """Architectures `clap train --model-config` builds: encoder sizes, fusion, clip length, parameters."""
    from ..models.presets import preset, preset_description, preset_names

    rows = []
    for name in preset_names():
        cfg = preset(name)
        a, t = cfg.audio, cfg.text
        shape = ("-".join(map(str, a.pann_channels)) if a.encoder == "cnn14"
                 else f"{a.patch_embeds_hidden_size}×{'-'.join(map(str, a.depths))}")
        audio, text = f"{a.encoder} {shape}", f"{t.model_type} {t.num_hidden_layers}x{t.hidden_size}"
        if a.encoder == "resnet18":  # Wav2CLIP: ResNet width; the CLIP text tower is loaded from a reference
            audio, text = f"resnet18 width {a.resnet_width}", f"CLIP text {cfg.text_tower} (lazy)"
        rows.append({"name": name, "audio": audio, "fused": cfg.fused,
                     "clip_seconds": round(cfg.frontend.clip_samples / cfg.frontend.sample_rate, 2),
                     "text": text, "dim": cfg.projection_dim, "description": preset_description(name)})
    _show(rows, as_json, "model presets (clap train --model-config NAME)",
          ("name", "audio", "fused", "clip s", "text", "dim", "description"), lambda r: (
              r["name"], r["audio"], "yes" if r["fused"] else "no", str(r["clip_seconds"]), r["text"], str(r["dim"]),
              r["description"]))


def _show(rows: list[dict], as_json: bool, title: str, columns, cells) -> None:
    """JSON lines when asked or piped, else a table whose row for `r` is `cells(r)`."""
    if as_json or not output.is_terminal():
        for r in rows:
            output.json_line(r)
        return
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for r in rows:
        table.add_row(*cells(r))
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
