"""MkDocs hook: publish benchmarks/RESULTS.md, which lives beside the benchmarks, as the page results.md.

Its links point into benchmarks/ (e.g. `README.md`, how to reproduce); on the site they become the file names,
as code, since those files are not pages.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "RESULTS.md"


def on_files(files, config):
    text = RESULTS.read_text(encoding="utf-8")
    text = re.sub(r"\[([^\]]+)\]\((?!https?://)([^)#]+)\)", lambda m: f"`benchmarks/{m.group(2)}`", text)
    files.append(File.generated(config, "results.md", content=text))
    return files
