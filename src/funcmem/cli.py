"""The ``funcmem`` command: a registry of subcommands, each imported only when it runs.

A command lives in a module that defines ``add_arguments(parser)`` and ``run_cli(args) -> int``.
``COMMANDS`` maps the command's name to that module, a one-line help and the extra it needs, so
``funcmem --help`` lists every command without importing one (the application's need the
``editing`` or ``serve`` extras; the core needs neither). Adding a command is one line here.

Errors: a mistake in what the user asked for (a missing file, a bad value, a damaged checkpoint)
is one line on stderr, ``error: ...``, and exit status 2. Such errors are ``UsageError`` (raised by
the commands), ``OSError``, and the ``ValueError`` / ``NotImplementedError`` that funcmem raises
itself to refuse an input (see ``is_user_error``). Anything else is a bug and keeps its traceback;
``--debug`` (or ``FUNCMEM_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

from .version import __version__


class Command(NamedTuple):
    module: str  # defines add_arguments(parser) and run_cli(args)
    help: str
    extra: str | None = None  # the pip extra its imports need (None: the core alone)
    computes: bool = True  # runs models: its thread count is chosen and printed


COMMANDS: dict[str, Command] = {
    "toy": Command("funcmem.toy", "generator vs shared LoRA on a conflicting toy problem"),
    "bench": Command("funcmem.benchmarks", "benchmarks: ratios measured in one run (funcmem bench --help lists them)"),
    "convert": Command("funcmem.convert", "convert a generator checkpoint between formats (lossless)", computes=False),
    "demo": Command("funcmem.editing.benchmark.cli", "the image-editing benchmark: every method, every analysis, "
                    "a report", "editing"),
    "eval": Command("funcmem.editing.benchmark.evaluate", "evaluate a run's trained methods on another folder of "
                    "photos", "editing"),
    "edit": Command("funcmem.editing.apply", "edit one image with a run's generator", "editing"),
    "continual": Command("funcmem.editing.continual.cli", "continual learning: edit groups taught one after another, "
                         "forgetting measured; optionally remove edits (--forget a,b)", "editing"),
    "serve": Command("funcmem.serve.cli", "HTTP service and web page on a trained run (edits, LoRA export, metrics)",
                     "serve"),
    "loadtest": Command("funcmem.serve.loadtest", "concurrent edit requests against a local `funcmem serve`", "serve",
                        computes=False),
}


# ---------------------------------------------------------------- errors


class UsageError(Exception):
    """A mistake in what the user asked for: ``funcmem`` prints ``error: {message}`` and exits 2."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors raised as one-line ``UsageError`` s instead of a usage block."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def finite_float(text: str) -> float:
    """An argparse ``type``: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def raised_by_funcmem(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is funcmem's own code (a deliberate
    refusal), not a library's (a ValueError from inside torch or numpy is a bug of ours)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    package = Path(__file__).resolve().parent
    return tb is not None and package in Path(tb.tb_frame.f_code.co_filename).resolve().parents


def is_user_error(error: BaseException) -> bool:
    """A mistake in the input or the environment, reported in one line; anything else is a bug."""
    if isinstance(error, (UsageError, OSError, MemoryError)):
        return True
    return isinstance(error, (ValueError, NotImplementedError)) and raised_by_funcmem(error)


def one_line(error: BaseException) -> str:
    """The error's message on one line (an OSError as ``file: reason``)."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    elif isinstance(error, MemoryError):
        text = f"out of memory{': ' + str(error) if str(error) else ''}"
    else:
        text = str(error) or type(error).__name__
    out = ""
    for line in (line.strip() for line in text.splitlines() if line.strip()):
        out += (" " if out.endswith(":") else "; ") * bool(out) + line
    return out


# ---------------------------------------------------------------- commands


def load(name: str, command: Command):
    """Import a command's module; a missing extra is one line that says what to install."""
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as e:
        if command.extra is None or (e.name or "").startswith("funcmem"):
            raise
        raise UsageError(f"funcmem {name} needs the {command.extra!r} extra ({e.name} is missing): "
                         f"pip install 'funcmem[{command.extra}]'") from e


def add_commands(subparsers, registry: dict[str, Command], chosen: str | None, parents=()) -> None:
    """One subparser per registered command; only ``chosen``'s module is imported, to add its options."""
    for name, command in registry.items():
        parser = subparsers.add_parser(name, help=command.help, description=command.help, parents=list(parents))
        if name == chosen:
            module = load(name, command)
            module.add_arguments(parser)
            parser.set_defaults(run_cli=module.run_cli, computes=command.computes)


def global_options(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name (``defaults``: the top level's)."""
    parser = Parser(add_help=False, argument_default=None if defaults else argparse.SUPPRESS)
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="CPU threads for PyTorch (default: chosen from the free cores; printed at start)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (or FUNCMEM_DEBUG=1)")
    return parser


def chosen(argv: list[str], registry: dict[str, Command]) -> str | None:
    """The command an argument list asks for: its first word that is not an option or a global option's value."""
    try:
        _, rest = global_options(defaults=True).parse_known_args(argv)
    except UsageError:
        rest = argv
    word = next((a for a in rest if not a.startswith("-")), None)
    return word if word in registry else None


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    parser = Parser(prog="funcmem", description="Functional memory: generated per-instance LoRA for a frozen PyTorch "
                    "model.", parents=[global_options(defaults=True)])
    parser.add_argument("--version", action="version", version=f"funcmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS, chosen(list(argv), COMMANDS), parents=[global_options(defaults=False)])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``funcmem ARGV``; a user error is ``error: ...`` on stderr and status 2 (see the module doc)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FUNCMEM_DEBUG", "") not in ("", "0")
    try:
        args = build_parser(argv).parse_args(argv)
        debug = debug or args.debug
        if getattr(args, "computes", False):
            from .threads import configure_threads

            configure_threads(args.threads)
        return args.run_cli(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug or not is_user_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
