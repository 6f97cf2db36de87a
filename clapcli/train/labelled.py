"""Labelled audio for zero-shot validation (and, later, supervised finetuning): a folder with one subfolder
per class, or a CSV / JSONL manifest with `path` and `label` columns (paths relative to the manifest).

For multi-label data a manifest row may give `labels` instead: a JSON list (`["dog", "rain"]`) or a
`;`-separated string (`dog;rain`). `LabelledClip.label` is then the first of them, `labels` all of them."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError
from ..index.scan import AUDIO_EXTENSIONS


@dataclass(frozen=True)
class LabelledClip:
    path: Path
    label: str  # the (first) class
    labels: tuple[str, ...] = ()  # every class of a multi-label row; empty for single-label clips

    @property
    def all_labels(self) -> tuple[str, ...]:
        return self.labels or (self.label,)


def read_labelled(source: str | Path) -> list[LabelledClip]:
    """Every clip with its class, in a stable order; DataError when there is nothing usable."""
    root = Path(source).expanduser()
    if root.is_dir():
        clips = [
            LabelledClip(f, d.name)
            for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            for f in sorted(d.rglob("*"))
            if f.is_file() and f.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS
        ]
    elif root.is_file():
        clips = _read_manifest(root)
    else:
        raise UsageError(f"{root}: no such folder or manifest")
    if not clips:
        raise DataError("no labelled audio (expected class subfolders of audio files, or a manifest with "
                        "'path' and 'label')", source=str(root))
    return clips


def _read_manifest(path: Path) -> list[LabelledClip]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    elif path.suffix.lower() == ".jsonl":
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise DataError(f"not JSON lines ({exc})", source=str(path)) from exc
    else:
        raise UsageError(f"{path}: a labelled manifest must be .csv or .jsonl")
    clips = []
    for number, row in enumerate(rows, 1):
        labels = _row_labels(row) if isinstance(row, dict) else ()
        if not isinstance(row, dict) or not str(row.get("path") or "").strip() or not labels:
            raise DataError(f"row {number}: needs 'path' and 'label' (or 'labels')", source=str(path))
        p = Path(str(row["path"]).strip()).expanduser()
        p = p if p.is_absolute() else path.parent / p
        clips.append(LabelledClip(p, labels[0], labels if "labels" in row and row.get("labels") else ()))
    return clips


def _row_labels(row: dict) -> tuple[str, ...]:
    """A row's classes: `labels` (a list, a JSON list or a `;`-separated string), else `label`."""
    value = row.get("labels")
    if value is None or value == "":
        single = str(row.get("label") or "").strip()
        return (single,) if single else ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text.strip("[]").split(",")
        else:
            value = text.split(";")
    if not isinstance(value, list):
        value = [value]
    out: list[str] = []
    for v in value:
        v = str(v).strip()
        if v and v not in out:
            out.append(v)
    return tuple(out)
