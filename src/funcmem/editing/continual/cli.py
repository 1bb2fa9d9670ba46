"""``funcmem continual``: the protocol on the command line (the run flags are the demo's)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...cli import finite_float
from ..benchmark.cli import add_run_arguments, benchmark_config
from ..data import load_folder
from .config import EDIT_NAMES, METHODS, STAGE_DEFAULTS, ContinualConfig
from .protocol import run
from .removal import parse_edits


def edit_list(text: str) -> list[str]:
    """An argparse ``type``: comma-separated edit names (``removal.parse_edits``)."""
    try:
        return parse_edits(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem continual``'s options: the shared run flags (``--steps`` is per stage) and its own."""
    add_run_arguments(parser, "runs/continual")
    parser.add_argument("--forget", default=None, metavar="EDIT[,EDIT...]", type=edit_list,
                        help="afterwards, remove these edits from the fm_replay generator (stored conditions "
                             f"only); edits: {', '.join(EDIT_NAMES)}")
    parser.add_argument("--distill-weight", type=finite_float, default=None, help="fm_replay's distillation weight")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which methods to run")


def config(args: argparse.Namespace) -> ContinualConfig:
    """The settings the flags ask for."""
    stages = benchmark_config(args, **STAGE_DEFAULTS["quick" if args.quick else "full"])
    overrides = {} if args.distill_weight is None else {"distill_weight": args.distill_weight}
    return (ContinualConfig.quick(stages, **overrides) if args.quick
            else ContinualConfig(**overrides, benchmark=stages))


def run_cli(args: argparse.Namespace) -> int:
    if args.images:
        load_folder(args.images)  # a bad photo folder fails now, not after the editor's pretraining
    results = run(config(args), args.out, forget=args.forget, methods=args.methods)
    for m, r in results["methods"].items():
        print(f"{m:24s} average {r['average']:6.2f} dB  forgetting {r['mean_forgetting']:5.2f}  "
              f"BWT {r['backward_transfer']:+6.2f}  storage {r['storage_bytes']:,} B")
    if "forget" in results:
        f = results["forget"]
        print(f"forget {','.join(f['edits'])}: removed vs base (held-out) {f['removed_psnr_to_base_before']:.2f} -> "
              f"{f['removed_psnr_to_base']:.2f} dB; kept {f['kept_psnr_before']:.2f} -> {f['kept_psnr_after']:.2f} dB; "
              f"near misses {f['near_miss_psnr_before']:.2f} -> {f['near_miss_psnr_after']:.2f} dB; "
              f"relearnt {f['relearn_psnr']:.2f} dB")
    print(f"report: {Path(args.out) / 'continual.md'}")
    return 0
