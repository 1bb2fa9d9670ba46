"""The ``funcmem`` command: a registry of subcommands, each imported only when it runs.

A command lives in a module that defines ``add_arguments(parser)`` and ``run_cli(args) -> int``.
``COMMANDS`` maps the command's name to that module, a one-line help and the extra it needs, so
``funcmem --help`` lists every command without importing one (the application's need the
``editing`` or ``serve`` extras; the core needs neither). Adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from .version import __version__


class Command(NamedTuple):
    module: str  # defines add_arguments(parser) and run_cli(args)
    help: str
    extra: str | None = None  # the pip extra its imports need (None: the core alone)


COMMANDS: dict[str, Command] = {
    "toy": Command("funcmem.toy", "generator vs shared LoRA on a conflicting toy problem"),
    "bench": Command("funcmem.benchmarks", "benchmarks: ratios measured in one run (funcmem bench --help lists them)"),
    "convert": Command("funcmem.convert", "convert a generator checkpoint between formats (lossless)"),
    "demo": Command("funcmem.editing.benchmark.cli", "the image-editing benchmark: every method, every analysis, "
                    "a report", "editing"),
    "eval": Command("funcmem.editing.benchmark.evaluate", "evaluate a run's trained methods on another folder of "
                    "photos", "editing"),
    "edit": Command("funcmem.editing.apply", "edit one image with a run's generator", "editing"),
    "continual": Command("funcmem.editing.continual.cli", "continual learning: edit groups taught one after another, "
                         "forgetting measured; optionally remove one edit (--forget)", "editing"),
    "serve": Command("funcmem.serve.cli", "HTTP service and web page on a trained run (edits, LoRA export, metrics)",
                     "serve"),
    "loadtest": Command("funcmem.serve.loadtest", "concurrent edit requests against a local `funcmem serve`", "serve"),
}


def load(name: str, command: Command):
    """Import a command's module; a missing extra is one line that says what to install."""
    try:
        return importlib.import_module(command.module)
    except ModuleNotFoundError as e:
        if command.extra is None or (e.name or "").startswith("funcmem"):
            raise
        raise SystemExit(f"funcmem {name} needs the {command.extra!r} extra ({e.name} is missing): "
                         f"pip install 'funcmem[{command.extra}]'") from e


def add_commands(subparsers, registry: dict[str, Command], chosen: str | None) -> None:
    """One subparser per registered command; only ``chosen``'s module is imported, to add its options."""
    for name, command in registry.items():
        parser = subparsers.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            module = load(name, command)
            module.add_arguments(parser)
            parser.set_defaults(run_cli=module.run_cli)


def chosen(argv: list[str], registry: dict[str, Command]) -> str | None:
    """The command an argument list asks for: its first word that is not an option."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in registry else None


def build_parser(argv: list[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="funcmem", description="Functional memory: generated per-instance LoRA "
                                     "for a frozen PyTorch model.")
    parser.add_argument("--version", action="version", version=f"funcmem {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS, chosen(list(argv), COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return args.run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
