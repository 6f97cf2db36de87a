"""What `clap shards make` reads: the clips of a manifest or of a folder of audio, with their captions and tags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, UsageError, first_line
from .manifest import caption_cell, read_rows, tag_list


@dataclass
class SourceItem:
    """One clip to put in the shards, with what is known about its text."""

    path: Path  # absolute
    text: str | list[str] | None = None  # given caption(s)
    tags: list[str] | None = None  # given tags
    origin: str = ""  # where the caption came from ("manifest.csv:12", "x.txt"), for messages
    image: Path | None = None  # with an image column: the row's image (.jpg/.png frame or .npy embedding)


def _row_text(row: dict) -> tuple[str | list[str] | None, list[str] | None]:
    caption = row.get("caption", row.get("text"))
    tags = row.get("tags", row.get("tag"))
    return caption_cell(caption), tag_list(tags) or None


def read_manifest(path: str | os.PathLike, base: str | os.PathLike | None = None,
                  image_column: str | None = None) -> list[SourceItem]:
    """Rows of a CSV (`path` column, `caption` and/or `tags` columns) or JSONL manifest (the same keys).

    A caption is a string or a JSON list of strings; tags are a list as `manifest.tag_list` reads it (a JSON
    list, `dog;rain`, or `[dog, rain]`). `text` and `tag` are accepted as the column names too. With
    `image_column`, each row's image path is read from that column (a manifest without the column is a
    DataError; an empty cell leaves `image` None). Relative paths resolve against `base` (default: the
    manifest's folder). A malformed manifest is a DataError naming the file and line.
    """
    manifest = Path(path)
    base = Path(base) if base is not None else manifest.resolve().parent
    table = read_rows(manifest)
    columns = table.columns
    if columns is not None:
        if "path" not in columns:
            raise DataError("needs a 'path' column (and 'caption' and/or 'tags')", source=str(manifest))
        if image_column is not None and image_column not in columns:
            raise DataError(f"has no column {image_column!r} (--images); its columns: {', '.join(columns)}",
                            source=str(manifest))
    items = []
    for number, row in table.rows:
        value = row.get("path")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"line {number}: no 'path'", source=str(manifest))
        p = Path(value.strip()).expanduser()
        caption, tags = _row_text(row)
        image = None
        if image_column is not None:
            if columns is None and image_column not in row:
                raise DataError(f"line {number}: no {image_column!r} key (--images)", source=str(manifest))
            cell = row.get(image_column)
            if isinstance(cell, str) and cell.strip():
                image = Path(cell.strip()).expanduser()
                image = image if image.is_absolute() else base / image
        items.append(SourceItem(path=p if p.is_absolute() else base / p, text=caption, tags=tags,
                                origin=f"{manifest.name}:{number}", image=image))
    return items


def _sidecar(audio: Path) -> tuple[str | list[str] | None, list[str] | None, str]:
    txt, js = audio.with_suffix(".txt"), audio.with_suffix(".json")
    if js.is_file():
        try:
            row = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"sidecar is not valid JSON ({first_line(exc)})", source=str(js)) from exc
        if not isinstance(row, dict):
            raise DataError("sidecar must hold a JSON object with text/caption and/or tags", source=str(js))
        caption, tags = _row_text(row)
        return caption, tags, js.name
    if txt.is_file():
        try:
            lines = [ln.strip() for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot be read ({first_line(exc)})", source=str(txt)) from exc
        return (lines[0] if len(lines) == 1 else lines) or None, None, txt.name
    return None, None, ""


def collect_sources(src: str | os.PathLike, captions: str | os.PathLike | None = None,
                    image_column: str | None = None) -> tuple[list[SourceItem], list[tuple[str, str]]]:
    """The clips of `src` with their text, and (path, reason) of those that have to be skipped now.

    - `src` a .csv/.jsonl manifest: its rows, in order; relative paths resolve against the manifest's folder.
    - `src` a folder: its audio files (recursively, sorted). Their text comes from the `captions` manifest
      when given (rows matched by path; relative paths there resolve against `src`; files without a row are
      skipped), else from sidecars `x.json` (`text`/`caption` and/or `tags`) or `x.txt` (one caption per
      line; several lines give a list).

    `image_column` (`--images`) reads each clip's image from that manifest column, so it needs a manifest.
    """
    source = Path(src)
    if source.is_file():
        if captions is not None:
            raise UsageError("--captions is for a folder of audio; a manifest SRC carries its own captions")
        return read_manifest(source, image_column=image_column), []
    if not source.is_dir():
        raise UsageError(f"{source}: no such file or folder")
    if image_column is not None and captions is None:
        raise UsageError("--images names a manifest column: give SRC as a .csv/.jsonl manifest, or --captions")
    from ..index.scan import ScanProblem, scan

    problems: list[ScanProblem] = []
    files = [e.path for e in scan([source], problems=problems)]
    skipped = [(str(p.path), p.reason) for p in problems if not p.unread_dir]
    skipped += [(str(p.path), f"folder cannot be listed ({p.reason})") for p in problems if p.unread_dir]
    if captions is not None:
        root = source.resolve()
        by_path = {}
        for item in read_manifest(captions, base=root, image_column=image_column):
            by_path[str(item.path.resolve())] = item
        items = []
        for f in files:
            item = by_path.pop(str(f), None)
            if item is None:
                skipped.append((str(f), f"no row for it in {Path(captions).name}"))
            else:
                items.append(SourceItem(path=f, text=item.text, tags=item.tags, origin=item.origin, image=item.image))
        for path, item in by_path.items():
            skipped.append((path, f"named in {item.origin} but not an audio file under {source}"))
        return items, skipped
    items = []
    for f in files:
        try:
            caption, tags, origin = _sidecar(f)
        except DataError as exc:
            skipped.append((str(f), f"{Path(exc.source or f).name}: {exc.reason}"))
            continue
        items.append(SourceItem(path=f, text=caption, tags=tags, origin=origin))
    return items, skipped
