"""Where the installed `clap` console script is: beside this interpreter (a venv's bin/), else on PATH."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def clap_executable() -> str:
    found = shutil.which("clap", path=str(Path(sys.executable).parent)) or shutil.which("clap")
    assert found, "the `clap` entry point is not installed (pip install -e .)"
    return found
