"""Benchmarks: figures that are ratios of two measurements from one run, written as JSON; never tests.

``funcmem bench NAME [options]`` runs one; ``funcmem bench all`` runs every registered benchmark
with its defaults (``make bench``). A benchmark is a module defining ``add_arguments(parser)`` and
``run_cli(args) -> int``; adding one is one line in ``BENCHMARKS``.

    timing.py           medians of interleaved repeats, growth exponents
    lora_speed.py       ``lora``: per-sample LoRA application vs the base, loops, merging, PEFT
    threads.py          ``threads``: steps/s under each thread policy, beside a busy process or not
    generator_speed.py  generation cost and scaling (used by ``lora``)
    fit.py              ``fit``: a generator told the task vs a bank of per-task LoRAs (losses, ratios, parameters)
"""

from __future__ import annotations

import argparse

from ..cli import Command, add_commands, global_options, load

BENCHMARKS: dict[str, Command] = {
    "lora": Command("funcmem.benchmarks.lora_speed", "dynamic LoRA: per-sample application vs the base, loops, "
                    "merging and PEFT; generator cost (runs/bench/lora.json)"),
    "threads": Command("funcmem.benchmarks.threads", "training steps/s under each thread policy, with and without a "
                       "busy neighbour (runs/bench/threads.json)"),
    "fit": Command("funcmem.benchmarks.fit", "fit parity: a generator told the task vs a bank of per-task LoRAs; "
                   "losses, ratios, parameters, time per step (runs/bench/fit.json)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem bench``: one subcommand per benchmark, and ``all``."""
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    every = sub.add_parser("all", help="every benchmark below, each with its defaults",
                           parents=[global_options(defaults=False)])
    every.set_defaults(run_cli=run_all)
    for name, command in BENCHMARKS.items():  # the group is imported only when run: so are its benchmarks
        add_commands(sub, {name: command}, name, parents=[global_options(defaults=False)])


def run_all(args: argparse.Namespace) -> int:
    """Each registered benchmark with its default options; the worst exit status."""
    status = 0
    for name, command in BENCHMARKS.items():
        parser = argparse.ArgumentParser(prog=f"funcmem bench {name}")
        module = load(name, command)
        module.add_arguments(parser)
        print(f"== funcmem bench {name}", flush=True)
        status = max(status, module.run_cli(parser.parse_args([])))
    return status


def run_cli(args: argparse.Namespace) -> int:
    return args.run_cli(args)
