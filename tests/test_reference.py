"""The documentation cannot drift from the command line: the command reference (docs/reference.md) and the man
page (man/clap.1) are generated from the typer app by docs/gen_reference.py, and the committed files must equal a
fresh generation. The README stays a README whose test command is what .ci/run runs, after the docs build."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent


def generator():
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_committed_reference_and_man_page_equal_a_fresh_generation():
    for path, fresh in generator().outputs().items():
        committed = path.read_text(encoding="utf-8")
        diff = "".join(list(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True),
                                                 "committed", "generated"))[:40])
        assert committed == fresh, f"{path.relative_to(ROOT)} is stale: run `python docs/gen_reference.py`\n{diff}"


def test_every_command_of_the_app_is_in_the_reference_and_the_man_page():
    gen = generator()
    found = gen.commands()
    paths = [c.path for c in found]
    for path in ("clap", "clap index", "clap index list", "clap index rm", "clap search", "clap tag", "clap embed",
                 "clap train", "clap finetune", "clap models pull", "clap shards make", "clap eval zeroshot"):
        assert path in paths
    reference, man = gen.render_reference(found), gen.render_man(found)
    assert man.isascii()  # …, −, → as \[uXXXX]: groff reads it without preconv
    for path in paths[1:]:
        assert f"## `{path}`" in reference
        assert f'.SS "{gen._roff(path)}"' in man
    search = next(c for c in found if c.path == "clap search")
    assert search.usage.startswith("clap search [OPTIONS]")
    assert any("--min-score" in p.name for p in search.params)


def test_an_option_reaches_both_documents_with_its_help_default_and_environment_variable():
    app = typer.Typer(help="A tool.")

    @app.command("greet")
    def greet(
        name: str = typer.Argument(..., help="Who to greet."),
        times: int = typer.Option(3, "--times", "-t", min=1, envvar="GREET_TIMES", help="How often, *loudly*."),
        hidden: bool = typer.Option(False, "--secret", hidden=True),
    ) -> None:
        """Say hello.

        A second paragraph, with `code`.
        """

    @app.command("wave")
    def wave() -> None:
        """Wave."""

    gen = generator()
    found = gen.walk(typer.main.get_command(app), "tool")
    assert [c.path for c in found] == ["tool", "tool greet", "tool wave"]
    greet_doc = found[1]
    assert greet_doc.help == ["Say hello.", "A second paragraph, with `code`."]
    assert [p.name for p in greet_doc.params if p.kind == "option"] == ["-t, --times <int range>"]

    reference = gen.render_reference(found)
    assert "- [`tool greet`](#tool-greet): Say hello." in reference
    assert "How often, \\*loudly\\*.  \\[env var: GREET\\_TIMES; default: 3; x\\>=1\\]" in reference
    assert "A second paragraph, with `code`." in reference
    assert "--secret" not in reference

    man = gen.render_man(found)
    assert '.SS "tool greet"' in man and "\\fB\\-t, \\-\\-times <int range>\\fR" in man
    assert "A second paragraph, with \\fBcode\\fR." in man and "secret" not in man


def test_check_names_a_stale_file_and_a_run_rewrites_it(tmp_path, monkeypatch, capsys):
    gen = generator()
    reference, man = tmp_path / "reference.md", tmp_path / "clap.1"
    monkeypatch.setattr(gen, "REFERENCE", reference)
    monkeypatch.setattr(gen, "MAN_PAGE", man)
    monkeypatch.setattr(gen, "ROOT", tmp_path)
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    reference.write_text(reference.read_text().replace("--min-score", "--min-scor"))
    assert gen.main(["--check"]) == 1
    assert "reference.md is out of date: run `python docs/gen_reference.py`" in capsys.readouterr().err
    assert "--min-scor " in reference.read_text()  # --check writes nothing
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0


def test_readme_is_short_and_its_test_command_is_what_ci_runs_last_after_the_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    assert len(readme) <= 250
    assert "    " + ci[-1] in readme  # the README's test command, verbatim
    docs_build = [i for i, line in enumerate(ci) if "mkdocs build --strict" in line]
    assert docs_build and docs_build[0] < len(ci) - 1


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)]+)\)", text) if not t.startswith(("http", "#"))]
    assert "docs/index.md" in targets and "docs/reference.md" in targets
    assert [t for t in targets if not (ROOT / t).exists()] == []
