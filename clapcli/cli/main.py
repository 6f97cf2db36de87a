"""The `clap` command: a typer app with one thin module per command.

Torch, transformers and the model code are imported inside the commands, so `clap --help`
and shell completion stay instant.
"""

from __future__ import annotations

import os
import sys

import typer
from typer.core import TyperGroup

from . import dedupe, embed, eval, finetune, index, mcp, models, output, search, serve, shards, tag, train


class _ClapGroup(TyperGroup):
    """The root command; `--debug` is read wherever it stands before a `--` (`clap search rain --debug`), as it
    applies to the whole run rather than to one command."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, debug_first(args))

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # `clap tag … | head -2`: the reader has what it wanted, as with any Unix filter
            _quiet_stdout()
            raise typer.Exit(0) from None


def debug_first(args: list[str]) -> list[str]:
    """`args` with a `--debug` given after the command moved before it, where the root option is parsed."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:end]:
        return args
    return ["--debug"] + [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]


app = typer.Typer(
    name="clap",
    cls=_ClapGroup,
    help="Tag and search audio with contrastive language-audio models (LAION-CLAP).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"clap {version('clapcli')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            from ..version import __version__

            print(f"clap {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors, and the debug log "
                               "(what audio decoders printed) on stderr."),
    version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    output.state.debug = debug
    if debug:
        import logging

        log = logging.getLogger("clapcli")
        if not any(h.get_name() == "clap-debug" for h in log.handlers):
            handler = logging.StreamHandler(sys.stderr)
            handler.set_name("clap-debug")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
            log.addHandler(handler)
        log.setLevel(logging.DEBUG)


for _command in (index, search, tag, embed, models, shards, train, finetune, eval, dedupe, serve, mcp):
    _command.register(app)


def main() -> None:
    try:
        code = app(standalone_mode=False)  # in this mode typer returns an Exit's code instead of exiting
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every error becomes one line and an exit code
        sys.exit(output.report_exception(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail again on the closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
