"""``funcmem demo``, and the flags it shares with ``funcmem continual``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ... import io
from ...cli import UsageError, positive_int
from ...threads import choose_processes
from ..conditions import CONDITIONS
from .config import BASE_INSTRUCTIONS, BenchmarkConfig
from .report import write_report
from .run import run


def add_run_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The flags every training command of the application takes (``benchmark_config`` reads them)."""
    parser.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores")
    parser.add_argument("--out", default=out)
    parser.add_argument("--images", default=None, help="a folder of JPEG/PNG photos to use instead of the bundled ones")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=positive_int, default=None, help="override the training steps of every method")
    parser.add_argument("--cache-dir", default=None, help="where the pretrained base editor is cached")


def benchmark_config(args: argparse.Namespace, **defaults) -> BenchmarkConfig:
    """The settings the shared flags ask for: ``BenchmarkConfig.quick`` with ``--quick``, else the full
    run's, with ``defaults`` (the command's own) and then the flags on top."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this PyTorch sees no CUDA GPU; run on --device cpu")
    overrides = {**defaults, "images": args.images, "device": args.device, "cache_dir": args.cache_dir}
    if args.steps:
        overrides["steps"] = args.steps
    return BenchmarkConfig.quick(**overrides) if args.quick else BenchmarkConfig(**overrides)


def condition_list(text: str) -> list[str]:
    """An argparse ``type``: comma-separated condition names, each known and given once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONDITIONS]
    if not names or unknown or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names from {', '.join(CONDITIONS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem demo``'s options."""
    add_run_arguments(parser, "runs/demo")
    parser.add_argument("--condition", default=None, type=condition_list, metavar="NAME[,NAME...]",
                        help="the generator's conditions, the first the main one (rows functional_memory and "
                        f"functional_memory[NAME]); names: {', '.join(CONDITIONS)} (default: encoders; the full "
                        "run: encoders,label,label-value)")
    parser.add_argument("--workers", type=positive_int, default=None, metavar="N",
                        help="processes training seeds side by side, one thread each (default: the free cores, "
                             "at most one per seed; printed at start)")
    parser.add_argument("--base-instruction", default="instruction", choices=list(BASE_INSTRUCTIONS),
                        help="neutral: the frozen base reads a fixed neutral instruction, so only the adapter carries "
                             "the instance (an ablation)")


def run_cli(args: argparse.Namespace) -> int:
    cfg = benchmark_config(args)
    cfg.base_instruction = args.base_instruction
    if args.condition:
        cfg.conditions = args.condition
    workers, why = choose_processes(len(cfg.seeds), args.workers)
    hint = "" if why == "--workers" else "; --workers N to change"
    print(f"seed processes: {workers} ({why}{hint})", file=sys.stderr, flush=True)
    results = run(cfg, args.out, workers=workers)
    figures = io.torch_load(Path(args.out) / "figures.pt", allow_numpy=True)  # weights_only: no code runs
    write_report(Path(args.out), results, figures)
    (Path(args.out) / "figures.pt").unlink()
    fit = results.get("methods_train", {})
    for split, table in results["eval"].items():
        print(split)
        print("\n".join(f"  {k:28s} PSNR {v['psnr']:6.2f} ± {v['psnr_std']:.2f}  SSIM {v['ssim']:.3f}"
                        + (f"  (training examples {fit[k]['psnr']:.2f})" if k in fit else "") for k, v in table.items()))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
