"""Labelled audio for zero-shot validation (and, later, supervised finetuning): a folder with one subfolder
per class, or a CSV / JSONL manifest with `path` and `label` columns (paths relative to the manifest).

For multi-label data a manifest row may give `labels` instead: a list as `manifest.tag_list` reads it (a JSON
list `["dog", "rain"]`, `dog;rain` or `[dog, rain]`), the same rule as the tags of `clap shards make`.
`LabelledClip.label` is then the first of them, `labels` all of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError
from ..index.scan import AUDIO_EXTENSIONS
from .manifest import Manifest, read_rows, tag_list


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
        clips = labelled_rows(read_rows(root, what="a labelled manifest"))
    else:
        raise UsageError(f"{root}: no such folder or manifest")
    if not clips:
        raise DataError("no labelled audio (expected class subfolders of audio files, or a manifest with "
                        "'path' and 'label')", source=str(root))
    return clips


def labelled_rows(manifest: Manifest) -> list[LabelledClip]:
    """A clip per row of a manifest with `path` and `label` (or `labels`), paths relative to its folder."""
    clips = []
    for number, row in manifest.rows:
        labels = _row_labels(row)
        if not str(row.get("path") or "").strip() or not labels:
            raise DataError(f"line {number}: needs 'path' and 'label' (or 'labels')", source=str(manifest.path))
        p = Path(str(row["path"]).strip()).expanduser()
        p = p if p.is_absolute() else manifest.path.parent / p
        clips.append(LabelledClip(p, labels[0], labels if "labels" in row and row.get("labels") else ()))
    return clips


def _row_labels(row: dict) -> tuple[str, ...]:
    """A row's classes: `labels` (a list, by `tag_list`'s rule), else `label`."""
    value = row.get("labels")
    if value is None or value == "":
        single = str(row.get("label") or "").strip()
        return (single,) if single else ()
    return tuple(tag_list(value))
