"""The package's floors (pyproject.toml [tool.importlinter], docs/development.md "Floors") and one home per concept.

- the import-linter contracts hold, and a planted upward import breaks them (so the check can fail);
- no import circle, counting imports inside functions (a circle hidden in a function is still a circle), and
  no module imports the package façade `clapcli/__init__.py`;
- one module reads each part of the environment (home.py CLAP_HOME, dist.py the launcher variables, tested in
  test_home_atomic.py and here); one helper gives the first line of an exception; hub ids and the zero-shot
  prompt are written once.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clapcli"


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the `clapcli` package found in `package_parent`, with this checkout's contracts."""
    env = dict(os.environ, PYTHONPATH=str(package_parent))
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code, str(ROOT / "pyproject.toml")], capture_output=True,
                          text=True, env=env, cwd=package_parent, timeout=300)


def test_the_floors_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def test_an_upward_import_breaks_the_floors(tmp_path):
    """The contracts can fail: an import inside a function of models/ reaching up to the engine (the kind of
    arrow models/classifier.py had) is reported with its line."""
    shutil.copytree(PACKAGE, tmp_path / "clapcli", ignore=shutil.ignore_patterns("__pycache__"))
    planted = tmp_path / "clapcli" / "models" / "presets.py"
    up = "\n\ndef _up():\n    from ..engine.load import load_model\n\n    return load_model\n"
    planted.write_text(planted.read_text() + up)
    proc = lint_imports(tmp_path)
    assert proc.returncode == 1
    assert "BROKEN" in proc.stdout and "clapcli.models.presets -> clapcli.engine.load" in proc.stdout


def _graph():
    import grimp

    return grimp.build_graph("clapcli", include_external_packages=False)


def test_no_import_circles_even_through_imports_inside_functions():
    graph = _graph()
    modules = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules)))
    for m in modules:
        if m not in index:
            visit(m)
    assert circles == []


def test_nothing_in_the_package_imports_its_facade():
    """`clapcli/__init__.py` is the public façade (load_model, load_classifier): it imports the engine, so a
    module below importing it points up (`__version__` lives in clapcli/version.py for that reason)."""
    importers = sorted(_graph().find_modules_that_directly_import("clapcli"))
    assert importers == []


def test_the_engine_is_a_package_the_facade_loads_from():
    """api.py became clapcli/engine/ (issue 18) with no shim left behind: the façade's loaders come from
    engine/load.py, and importing the package itself pulls in nothing (torch loads with the module asked for)."""
    graph = _graph()
    assert "clapcli.api" not in graph.modules
    assert {"clapcli.engine.clap", "clapcli.engine.streaming", "clapcli.engine.whole_clip",
            "clapcli.engine.load"} <= graph.modules
    assert graph.find_modules_directly_imported_by("clapcli") == {"clapcli.version", "clapcli.engine.load"}
    assert graph.find_modules_directly_imported_by("clapcli.engine") == set()


def _python_files():
    return sorted(PACKAGE.rglob("*.py"))


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


LAUNCHER_VARIABLES = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def test_dist_is_the_only_reader_of_the_launcher_variables():
    readers = sorted(str(p.relative_to(PACKAGE)) for p in _python_files()
                     if any(s in LAUNCHER_VARIABLES or s.startswith("SLURM_") for s in _string_constants(p)))
    assert readers == ["dist.py"]


def _first_line_by_hand(node: ast.AST) -> bool:
    """`<call>.splitlines()[0]` or `<call>.split("\\n")[0]`."""
    if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == 0
            and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)):
        return False
    call = node.value
    newline = [a for a in call.args if isinstance(a, ast.Constant) and a.value == "\n"]
    return call.func.attr == "splitlines" or (call.func.attr == "split" and bool(newline))


def test_the_first_line_of_an_exception_has_one_helper():
    """`str(exc).splitlines()[0]` raises IndexError on an empty message and hides the error: errors.first_line."""
    found = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in _python_files()
             for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if _first_line_by_hand(node)]
    assert found == []


CONSTANT_HOMES = {
    "openai/clip-vit-base-patch32": "models/registry.py",
    "FacebookAI/roberta-base": "models/registry.py",
    "roberta-base": None,  # only the hub id above
    "google-bert/bert-base-uncased": "models/registry.py",
    "bert-base-uncased": None,  # the legacy spelling of the id above
    "This is a sound of {}.": "tagging/prompts.py",
}


@pytest.mark.parametrize("value,home", CONSTANT_HOMES.items())
def test_constants_are_written_once(value, home):
    where = sorted(str(p.relative_to(PACKAGE)) for p in _python_files() if value in set(_string_constants(p)))
    assert where == ([home] if home else [])
