"""The ``funcmem`` command: thin wrappers over the library."""

from __future__ import annotations

import argparse
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
    demo = sub.add_parser("demo", help="the main demo (until the editing benchmark lands: the toy problem)")
    demo.add_argument("--quick", action="store_true")
    demo.add_argument("--steps", type=int, default=None)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=lambda a: cmd_toy(argparse.Namespace(**{**vars(a), "steps": a.steps or (300 if a.quick else 1000)})))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
