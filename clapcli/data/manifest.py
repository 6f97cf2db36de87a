"""The one reader of CSV / JSONL manifests: `clap shards make`, labelled data (`clap finetune`, zero-shot
validation) and `clap eval` all read their rows here, so a cell means the same thing to each of them.

A manifest is a `.csv` with a header row or a `.jsonl` with one JSON object per line; paths in it are relative
to the manifest's folder unless a caller says otherwise.

A list of tags or labels (`tags`/`tag` for `clap shards make`, `labels` for labelled data) is, by `tag_list`:

- in JSONL, a JSON list (`["dog", "rain"]`); a plain string follows the CSV rule below;
- in CSV, a `;`-separated string (`dog;rain`, the separator spreadsheets leave alone), or a bracketed list as
  JSON or Python write it (`["dog", "rain"]`, `['dog', 'rain']`, `[dog, rain]`), split at its commas.

So `"[dog, rain]"` is the two tags `dog` and `rain` everywhere. Each item is stripped, empty items dropped and
repeats kept once, in order. A comma outside brackets belongs to the tag (`dog, barking` is one tag).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

from ..errors import DataError, UsageError, first_line

MANIFEST_SUFFIXES = (".csv", ".jsonl")


class ManifestRow(NamedTuple):
    line: int  # the line it starts on, for messages ("manifest.csv:12")
    cells: dict  # column -> value: strings in CSV, any JSON value in JSONL


class Manifest(NamedTuple):
    path: Path
    columns: list[str] | None  # a CSV's header; None for JSONL, whose keys are per row
    rows: list[ManifestRow]


def read_rows(path: str | os.PathLike, what: str = "a manifest") -> Manifest:
    """Every row of a CSV or JSONL manifest. A file of another suffix is a UsageError naming `what` it should
    be; an unreadable file, or a JSONL line that is not a JSON object, is a DataError naming the file and line."""
    manifest = Path(path)
    suffix = manifest.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise UsageError(f"{manifest}: {what} must be .csv or .jsonl")
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot be read ({first_line(exc)})", source=str(manifest)) from exc
    rows: list[ManifestRow] = []
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        columns = list(reader.fieldnames or [])
        for cells in reader:
            rows.append(ManifestRow(reader.line_num, dict(cells)))
        return Manifest(manifest, columns, rows)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            cells = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"line {number}: not valid JSON ({first_line(exc)})", source=str(manifest)) from exc
        if not isinstance(cells, dict):
            raise DataError(f"line {number}: not a JSON object", source=str(manifest))
        rows.append(ManifestRow(number, cells))
    return Manifest(manifest, None, rows)


def tag_list(value) -> list[str]:
    """A cell holding tags or labels as a list (the rule in this module's docstring); [] for none."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError:
                parsed = [item.strip().strip("'\"") for item in text[1:-1].split(",")]
            value = parsed if isinstance(parsed, list) else [parsed]
        else:
            value = text.split(";")
    elif not isinstance(value, list):
        value = [value]
    out: list[str] = []
    for item in value:
        item = str(item).strip()
        if item and item not in out:
            out.append(item)
    return out


def caption_cell(value) -> str | list[str] | None:
    """A cell holding a caption: a string, or several as a list (a JSON list, also inside a CSV string). A
    caption is free text, so a string that is not a JSON list is one caption, brackets and all."""
    if value is None:
        return None
    if isinstance(value, list):
        caps = [str(v).strip() for v in value if str(v).strip()]
        return (caps[0] if len(caps) == 1 else caps) or None
    text = str(value).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(parsed, list):
            return caption_cell(parsed)
    return text or None
