"""Write the command reference (docs/reference.md) and the man page (man/clap.1) from the `clap` typer app.

    python docs/gen_reference.py           # rewrite both files
    python docs/gen_reference.py --check   # exit 1, naming the stale file, when either differs from a fresh run

Both are made from the commands typer builds (`typer.main.get_command`), with each option's help record
exactly as `clap COMMAND --help` prints it, so `--help`, the reference and the man page cannot drift apart.
tests/test_reference.py fails when a committed file is stale: change an option, then run this script.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
MAN_PAGE = ROOT / "man" / "clap.1"

# `clap index list|rm` are dispatched by the index command itself (a folder named `list` is indexed), so they
# are not click subcommands of `index`: the reference takes them from the typer app that runs them.
EXTRA_SUBCOMMANDS = {"clap index": ("clapcli.cli.index_admin", "admin_app")}


@dataclass(frozen=True)
class Param:
    kind: str  # "argument" or "option"
    name: str  # as --help shows it: "-i, --index TEXT", "DIRS..."
    help: str  # the help text with its [default: …; env var: …] tail


@dataclass(frozen=True)
class Command:
    path: str  # "clap index list"
    usage: str  # "clap index [OPTIONS] [DIRS]..."
    help: list[str]  # paragraphs
    params: list[Param]
    subcommands: list[tuple[str, str]]  # (path, one-line summary)


def _paragraphs(text: str | None) -> list[str]:
    text = inspect.cleandoc(text or "")
    return [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text) if block.strip()]


def _summary(cmd) -> str:
    return cmd.get_short_help_str(limit=300)


def _context(cmd, name: str, parent=None):
    return cmd.context_class(cmd, info_name=name, parent=parent)


def walk(cmd, name: str = "clap", parent=None) -> list[Command]:
    """Every command under `cmd`, depth first in the order they were registered; hidden ones left out."""
    import importlib

    import typer

    ctx = _context(cmd, name, parent)
    path = ctx.command_path
    params = []
    for param in cmd.get_params(ctx):
        if param.name == "help":
            continue
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        kind = "argument" if param.param_type_name == "argument" else "option"
        params.append(Param(kind, record[0], record[1]))
    children = []  # (name, command, the context it runs under)
    if hasattr(cmd, "list_commands"):
        children = [(sub, cmd.get_command(ctx, sub), ctx) for sub in cmd.list_commands(ctx)]
    if path in EXTRA_SUBCOMMANDS:
        module, attribute = EXTRA_SUBCOMMANDS[path]
        group = typer.main.get_command(getattr(importlib.import_module(module), attribute))
        group_ctx = _context(group, name, parent)
        children += [(sub, group.get_command(group_ctx, sub), group_ctx) for sub in group.list_commands(group_ctx)]
    children = [child for child in children if not getattr(child[1], "hidden", False)]
    command = Command(
        path=path,
        usage=" ".join([path, *cmd.collect_usage_pieces(ctx)]),
        help=_paragraphs(cmd.help),
        params=params,
        subcommands=[(f"{path} {sub}", _summary(child)) for sub, child, _ in children],
    )
    found = [command]
    for sub, child, child_parent in children:
        found += walk(child, sub, child_parent)
    return found


def commands() -> list[Command]:
    import typer

    from clapcli.cli.main import app

    return walk(typer.main.get_command(app))


# -- Markdown ------------------------------------------------------------------------------------------------


def _md(text: str) -> str:
    """Text as Markdown shows it literally: code spans kept, characters that would format escaped elsewhere."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: no code spans
        parts = [text.replace("`", "\\`")]
    return "`".join(part if i % 2 else re.sub(r"([\\*_\[\]<>#|])", r"\\\1", part) for i, part in enumerate(parts))


def _anchor(path: str) -> str:
    return path.replace(" ", "-")


def render_reference(found: list[Command]) -> str:
    lines = [
        "# Command reference",
        "",
        "Every command and option of `clap`, as `clap COMMAND --help` prints them. This page is generated from",
        "the command line itself by `docs/gen_reference.py` (which writes the man page `man/clap.1` from the same",
        "source); the guides explain what the options do together.",
    ]
    for command in found:
        lines += ["", f"## `{command.path}`", "", "```text", command.usage, "```", ""]
        for paragraph in command.help:
            lines += [_md(paragraph), ""]
        for kind, title in (("argument", "Arguments"), ("option", "Options")):
            params = [p for p in command.params if p.kind == kind]
            if params:
                lines += [f"**{title}**", ""]
                lines += [f"- `{p.name}`" + (f": {_md(p.help)}" if p.help else "") for p in params]
                lines.append("")
        if command.subcommands:
            lines += ["**Commands**", ""]
            lines += [f"- [`{path}`](#{_anchor(path)}): {_md(summary)}" for path, summary in command.subcommands]
            lines.append("")
        while lines[-1] == "":
            lines.pop()
    return "\n".join(lines) + "\n"


# -- man page ------------------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, `code` in bold, no line read as a request, and
    characters beyond ASCII (…, −, →) as groff's \\[uXXXX], so no preprocessor is needed."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    parts = text.split("`")
    if len(parts) % 2 == 1:
        text = "".join(f"\\fB{part}\\fR" if i % 2 else part for i, part in enumerate(parts))
    return "\\&" + text if text[:1] in (".", "'") else text


MAN_DESCRIPTION = [
    "clap embeds audio and text into one vector space with a CLAP model, and builds on that to index and search "
    "a sound library, tag files with zero-shot labels or a finetuned classifier, export raw embeddings, make "
    "training shards, train and evaluate models.",
    "Every command takes `--help`. Errors are one line on standard error with a non-zero exit code; `--debug` "
    "(before the command) shows the traceback and the debug log.",
]
MAN_EXIT_STATUS = [
    ("0", "Done."),
    ("1", "A runtime error (a missing model or index, an index locked or built with another model, bad training "
          "data, ...), or some of the files given could not be read (the others are done and each failure is "
          "listed)."),
    ("2", "A usage error: options that do not fit together, nothing to do, an unknown label set, template, device "
          "or precision; reported before any model is loaded."),
    ("130", "Interrupted (Ctrl-C)."),
]
MAN_ENVIRONMENT = [
    ("CLAP_HOME", "Base directory for indexes and caches (default: the user data directory, e.g. "
                  "~/.local/share/clap)."),
    ("CLAP_MODEL, CLAP_INDEX, CLAP_ENGINE", "Defaults for `--model`, `--index` and `--engine`."),
    ("HF_HOME, HF_HUB_OFFLINE", "The Hugging Face cache holding model weights, and offline mode."),
    ("TORCH_HOME", "Where `clap models pull wav2clip` keeps Wav2CLIP.pt (hub/checkpoints/)."),
]
MAN_EXAMPLES = [
    "clap index ~/samples",
    'clap search "glass shattering" -k 20',
    "clap search --audio kick.wav -0 | xargs -0 -I{} cp {} picked/",
    "clap tag take.wav --labels audioset --multi-label --threshold 0.2 --json",
    'clap embed a.wav b.flac --text "a dog" --out emb.npy',
    "clap shards make clips.csv --out shards --val-fraction 0.1",
    "clap train --data shards --init laion/clap-htsat-fused --epochs 5 --out runs/sfx",
]


def render_man(found: list[Command]) -> str:
    from clapcli import __version__

    root, rest = found[0], found[1:]
    out = [
        f'.TH CLAP 1 "" "clapcli {__version__}" "User Commands"',
        ".\\\" Generated by docs/gen_reference.py from the clap command line; do not edit.",
        ".SH NAME",
        "clap \\- " + _roff(root.help[0].rstrip(".")[:1].lower() + root.help[0].rstrip(".")[1:]),
        ".SH SYNOPSIS",
        ".B clap",
        "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
        ".SH DESCRIPTION",
    ]
    for i, paragraph in enumerate(MAN_DESCRIPTION):
        out += ([".PP"] if i else []) + [_roff(paragraph)]
    out.append(".SH OPTIONS")
    out += _man_params(root.params)
    out.append(".SH COMMANDS")
    for command in rest:
        out += [f'.SS "{_roff(command.path)}"', ".nf", _roff(command.usage), ".fi"]
        for paragraph in command.help:
            out += [".PP", _roff(paragraph)]
        out += _man_params(command.params)
        if command.subcommands:
            out += [".PP", "Commands: " + ", ".join(f"\\fB{_roff(path)}\\fR" for path, _ in command.subcommands) + "."]
    out.append(".SH EXIT STATUS")
    for code, meaning in MAN_EXIT_STATUS:
        out += [".TP", f".B {code}", _roff(meaning)]
    out.append(".SH ENVIRONMENT")
    for name, meaning in MAN_ENVIRONMENT:
        out += [".TP", f".B {_roff(name)}", _roff(meaning)]
    out += [".SH EXAMPLES", ".nf", *(_roff(example) for example in MAN_EXAMPLES), ".fi"]
    out += [".SH SEE ALSO", _roff("The documentation in the docs/ folder of clapcli (built with `mkdocs build`): "
                                  "guides to indexing, searching, tagging, training, the audio pipeline, "
                                  "checkpoint formats and the Python API.")]
    return "\n".join(out) + "\n"


def _man_params(params: list[Param]) -> list[str]:
    out = []
    for param in params:
        out += [".TP", "\\fB" + _roff(param.name) + "\\fR"]
        if param.help:
            out.append(_roff(param.help))
    return out


# -- main ----------------------------------------------------------------------------------------------------


def outputs() -> dict[Path, str]:
    found = commands()
    return {REFERENCE: render_reference(found), MAN_PAGE: render_man(found)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
    for path in stale:
        print(f"{path.relative_to(ROOT)} is out of date: run `python docs/gen_reference.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
