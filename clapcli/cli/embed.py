"""`clap embed`: write audio and text embeddings to a .npy file or JSON lines."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import options, output


def embed(
    files: Optional[List[Path]] = typer.Argument(None, metavar="FILE", help="Audio files to embed.",
                                                 show_default=False),
    text: Optional[List[str]] = typer.Option(None, "--text", "-t", help="Text to embed (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write a float32 .npy of shape (N, D): "
                                       "audio rows in argument order, then text rows."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line with the embedding."),
    segments: bool = typer.Option(False, "--segments", help="With --json: add the embedding of each window (the "
                                  "model's clip length: 10 s for LAION-CLAP) of files longer than one."),
    model: Optional[str] = options.MODEL,
    device: str = options.DEVICE,
    precision: str = options.PRECISION,
    engine: Optional[str] = options.ENGINE,
    batch_size: int = options.BATCH_SIZE,
    tokenizer: Optional[str] = options.TOKENIZER,
) -> None:
    """Embed audio files and/or texts with the model (L2-normalised vectors)."""
    import numpy as np

    from ..atomic import write_npy
    from ..errors import UsageError

    files, text = files or [], text or []
    if not files and not text:
        raise UsageError("nothing to embed: give audio files and/or --text")
    if any(not t.strip() for t in text):
        raise UsageError("empty --text: give words to embed")
    if out is not None and out.suffix != ".npy":
        raise UsageError(f"--out must end in .npy, got {out}")
    if out is not None and not out.parent.is_dir():
        raise UsageError(f"--out: no such directory {out.parent}")
    m = options.load(model, device, precision, tokenizer, engine=engine)
    rows, records, failed = [], [], 0
    with output.ProgressBar("embedding", len(files)) as bar:
        for e in m.embed_files(files, batch_size=batch_size, segments=segments):
            bar.advance()
            if e.error:
                failed += 1
                output.stderr_console().print(f"[red]skipped:[/] {output.literal(e.path)}: {output.literal(e.error)}",
                                              highlight=False, soft_wrap=True)
                records.append({"type": "audio", "path": e.path, "error": e.error})
                rows.append(None)  # a NaN row keeps the .npy aligned with the arguments
                continue
            rows.append(e.embedding)
            rec = {"type": "audio", "path": e.path, "duration": round(e.duration, 4),
                   "embedding": e.embedding.tolist()}
            if e.partial is not None:  # embedded from the part that decodes
                output.stderr_console().print(f"[yellow]partial:[/] {output.literal(e.path)}: "
                                              f"{output.literal(e.partial)}", highlight=False, soft_wrap=True)
                rec["partial"] = e.partial
            if segments and e.segments:
                rec["segments"] = [{"start": round(s.start, 3), "end": round(s.end, 3),
                                    "embedding": s.embedding.tolist()} for s in e.segments]
            records.append(rec)
    if text:
        for t, vec in zip(text, m.embed_text(text)):
            rows.append(vec)
            records.append({"type": "text", "text": t, "embedding": vec.tolist()})
    if out is not None:
        nan = np.full(m.dim, np.nan, np.float32)
        matrix = np.stack([nan if r is None else r for r in rows]) if rows else np.zeros((0, m.dim))
        write_npy(out, matrix.astype(np.float32))
        output.stderr_console().print(f"wrote {len(rows)} × {m.dim} embeddings to {output.literal(out)}",
                                      highlight=False, soft_wrap=True)
    if as_json or (out is None and not output.is_terminal()):
        for rec in records:
            output.json_line(rec)
    elif out is None:
        _table(records, m.dim)
    if failed:
        raise typer.Exit(1)


def _table(records, dim) -> None:
    from rich.table import Table

    table = Table(title=f"embeddings ({dim}-d, L2-normalised; use --out or --json for the vectors)")
    for col in ("type", "input", "length", "first values"):
        table.add_column(col)
    for r in records:
        head = (" ".join(f"{v:+.3f}" for v in r["embedding"][:4]) if "embedding" in r
                else output.literal(r.get("error", "")))
        length = output.clock(r["duration"]) if r.get("duration") is not None else ""
        table.add_row(r["type"], output.literal(r.get("path") or r.get("text")), length, head)
    output.stdout_console().print(table)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
