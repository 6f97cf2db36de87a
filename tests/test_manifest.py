"""The one CSV/JSONL manifest reader (`clapcli.data.manifest`): its rule for tag and label lists, and the three
tools that read manifests through it (`clap shards make`, `clap finetune`'s labelled data, `clap eval`) giving
the same tags for the same cells."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from audio_synth import tone_noise, write_audio
from clapcli.data.manifest import read_rows, tag_list
from clapcli.errors import DataError, UsageError


@pytest.mark.parametrize("cell, tags", [
    (["dog", "rain"], ["dog", "rain"]),  # a JSON list (JSONL)
    ('["dog", "rain"]', ["dog", "rain"]),  # a JSON list in a CSV cell
    ("['dog', 'rain']", ["dog", "rain"]),  # as Python (and pandas' to_csv) writes a list
    ("[dog, rain]", ["dog", "rain"]),  # as people type one
    ("dog;rain", ["dog", "rain"]),
    (" dog ; rain ;; dog ", ["dog", "rain"]),  # stripped, empties dropped, repeats kept once
    ("dog, barking", ["dog, barking"]),  # a comma outside brackets belongs to the tag
    ("dog", ["dog"]),
    ("[]", []),
    ("", []),
    (None, []),
    (7, ["7"]),
])
def test_tag_list_rule(cell, tags):
    assert tag_list(cell) == tags


def test_rows_carry_their_line_and_a_bad_row_is_named(tmp_path):
    (tmp_path / "m.csv").write_text('path,tags\na.wav,"x;\ny"\nb.wav,z\n')
    manifest = read_rows(tmp_path / "m.csv")
    assert manifest.columns == ["path", "tags"]
    assert [(r.line, r.cells["path"]) for r in manifest.rows] == [(3, "a.wav"), (4, "b.wav")]  # ends of rows
    (tmp_path / "m.jsonl").write_text('{"path": "a.wav"}\n\n[1]\n')
    with pytest.raises(DataError, match="line 3: not a JSON object"):
        read_rows(tmp_path / "m.jsonl")
    with pytest.raises(UsageError, match="must be .csv or .jsonl"):
        read_rows(tmp_path / "m.txt")


CELLS = ['["dog", "rain"]', "['dog', 'rain']", "[dog, rain]", "dog;rain"]


def _manifests(folder: Path) -> list[Path]:
    """The same four clips as a CSV and as a JSONL manifest; each row writes dog+rain another way, in both the
    `tags` column (shards make) and the `labels` column (labelled data)."""
    folder.mkdir(parents=True)
    rows = []
    for i, cell in enumerate(CELLS):
        write_audio(folder / f"c{i}.wav", tone_noise(0.3, 48_000, seed=i), 48_000)
        rows.append({"path": f"c{i}.wav", "caption": f"clip {i}", "tags": cell, "labels": cell})
    with open(folder / "m.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "caption", "tags", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    jsonl = [{**row, "tags": ["dog", "rain"], "labels": ["dog", "rain"]} if i == 0 else row
             for i, row in enumerate(rows)]
    (folder / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in jsonl))
    return [folder / "m.csv", folder / "m.jsonl"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_shards_make_finetune_and_eval_read_the_same_tags(tmp_path, suffix):
    from clapcli.data.shard_writer import make_shards
    from clapcli.data.shards import iter_shard, resolve_split
    from clapcli.eval.evaluate import read_zeroshot_data
    from clapcli.train.classifier_data import read_data

    manifest = next(m for m in _manifests(tmp_path / "src") if m.suffix == suffix)
    want = [("dog", "rain")] * len(CELLS)

    report = make_shards(manifest, tmp_path / "shards")
    assert report.splits["train"]["samples"] == len(CELLS) and not report.skipped
    shard_tags = [tuple(raw.meta["tag"]) for url in resolve_split(tmp_path / "shards").urls for raw in iter_shard(url)]
    assert shard_tags == want

    assert [c.all_labels for c in read_data(manifest, multi_label=True)] == want  # finetune, from the manifest
    assert [c.all_labels for c in read_data(tmp_path / "shards", multi_label=True)] == want  # and from the shards
    assert [c.all_labels for c in read_zeroshot_data(manifest)] == want  # clap eval
