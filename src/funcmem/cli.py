"""The ``funcmem`` command: thin wrappers over the library."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path


def cmd_toy(args) -> int:
    """Generator vs shared LoRA on the conflicting toy problem (the core's smallest demo)."""
    import torch

    import funcmem
    from funcmem.toy import ConflictingTasks, ToyMLP
    from funcmem.train import Trainer, TrainConfig

    torch.manual_seed(args.seed)
    base = ToyMLP(32)
    tasks = ConflictingTasks(base, seed=args.seed)
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16,
                                  generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=16, token_dim=32))
    shared = funcmem.SharedLoRA(base, ["fc1", "fc2"], rank=64)

    def fm_loss(m, b):
        return ((m(b[0], b[1]) - b[2]) ** 2).mean()

    def shared_loss(m, b):
        return ((m(b[1]) - b[2]) ** 2).mean()

    cfg = dict(steps=args.steps, warmup_steps=20)
    Trainer(fm, fm_loss, TrainConfig(lr=3e-3, description="generator", **cfg)).fit(tasks.batch)
    Trainer(shared, shared_loss, TrainConfig(lr=1e-2, description="shared LoRA", **cfg)).fit(tasks.batch)
    test = tasks.batch(10**6, 1024)
    with torch.no_grad():
        result = {"generator": {"mse": fm_loss(fm, test).item(), "params": fm.num_trainable_parameters()},
                  "shared_lora": {"mse": shared_loss(shared, test).item(), "params": shared.num_trainable_parameters()},
                  "base": {"mse": ((base(test[1]) - test[2]) ** 2).mean().item()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    funcmem.io.write_json(out / "toy.json", result)
    print(json.dumps(result, indent=2))
    return 0


def cmd_demo(args) -> int:
    import funcmem.io
    from funcmem.editing.benchmark import BenchmarkConfig, run
    from funcmem.editing.report import write_report

    overrides = {"images": args.images, "device": args.device, "cache_dir": args.cache_dir}
    if args.steps:
        overrides["steps"] = args.steps
    cfg = BenchmarkConfig.quick(**overrides) if args.quick else BenchmarkConfig(**overrides)
    if args.condition:
        cfg.conditions = [args.condition] + [c for c in cfg.conditions if c != args.condition]
    results = run(cfg, args.out)
    figures = funcmem.io.torch_load(Path(args.out) / "figures.pt", allow_numpy=True)  # weights_only: no code runs
    write_report(Path(args.out), results, figures)
    (Path(args.out) / "figures.pt").unlink()
    m = results["methods"]
    print("\n".join(f"{k:28s} PSNR {v['psnr']:6.2f} ± {v['psnr_std']:.2f}  SSIM {v['ssim']:.3f}" for k, v in m.items()))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_eval(args) -> int:
    from funcmem.editing.benchmark import evaluate_run

    result = evaluate_run(args.run, args.images, args.out)
    for k, v in result["methods"].items():
        print(f"{k:28s} PSNR {v['psnr']:6.2f}  SSIM {v['ssim']:.3f}")
    return 0


def cmd_edit(args) -> int:
    from funcmem.editing.apply import edit_image, read_image, write_image
    from funcmem.editing.benchmark import load_run

    image = read_image(args.image)
    out = edit_image(load_run(args.run), image, args.instruction, args.method)
    write_image(out, args.output)
    print(f"wrote {args.output} ({out.shape[2]}x{out.shape[1]})")
    return 0


def cmd_bench(args) -> int:
    """Dynamic-LoRA benchmarks: ratios measured in one process, written to bench.json."""
    from funcmem.bench import run

    run("smoke" if args.smoke else "quick" if args.quick else "full", args.out, args.device, args.threads, args.dtype)
    return 0


# Modules that add their own subcommands: each defines ``add_commands(subparsers)``.
COMMAND_MODULES: list[str] = [
    "funcmem.editing.continual",
    "funcmem.hywu",
    "funcmem.serve.cli",
]


def build_parser() -> argparse.ArgumentParser:
    import funcmem

    parser = argparse.ArgumentParser(prog="funcmem", description="Functional memory: generated per-instance LoRA "
                                     "for a frozen PyTorch model.")
    parser.add_argument("--version", action="version", version=f"funcmem {funcmem.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    toy = sub.add_parser("toy", help="generator vs shared LoRA on a conflicting toy problem")
    toy.add_argument("--steps", type=int, default=300)
    toy.add_argument("--seed", type=int, default=0)
    toy.add_argument("--out", default="runs/toy")
    toy.set_defaults(func=cmd_toy)
    demo = sub.add_parser("demo", help="the image-editing benchmark: every method, every analysis, a report")
    demo.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--images", default=None, help="a folder of JPEG/PNG photos to use instead of the bundled ones")
    demo.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    demo.add_argument("--condition", default=None, choices=["encoders", "base-hidden"],
                      help="the generator's condition (default: encoders; the full run also reports base-hidden)")
    demo.add_argument("--steps", type=int, default=None, help="override the training steps of every method")
    demo.add_argument("--cache-dir", default=None, help="where the pretrained base editor is cached")
    demo.set_defaults(func=cmd_demo)
    ev = sub.add_parser("eval", help="evaluate a run's trained methods on another folder of photos")
    ev.add_argument("--run", required=True)
    ev.add_argument("--images", required=True)
    ev.add_argument("--out", default=None, help="default: RUN/eval.json")
    ev.set_defaults(func=cmd_eval)
    ed = sub.add_parser("edit", help="edit one image with a run's generator")
    ed.add_argument("--run", required=True)
    ed.add_argument("image")
    ed.add_argument("instruction")
    ed.add_argument("-o", "--output", required=True)
    ed.add_argument("--method", default="functional_memory")
    ed.set_defaults(func=cmd_edit)
    from funcmem.bench import add_arguments

    bench = add_arguments(sub.add_parser("bench", help="dynamic-LoRA benchmarks (ratios, bench.json)"))
    bench.set_defaults(func=cmd_bench)
    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
