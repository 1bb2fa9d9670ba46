"""A conflicting toy problem: one shared LoRA cannot serve every condition; a generated one can.

The base is a frozen 2-block residual MLP on vectors. Task k's target is the base with a rank-2
update ``+D_k`` or ``-D_k`` on the first block's ``fc1``: tasks come in opposite pairs, so the best
single static update is their mean, zero, while the right per-condition update is exact.
The condition is the task's fixed random embedding plus a little noise.

``funcmem toy`` trains a generator and a shared LoRA on it and writes their test MSE to ``toy.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .cli import UsageError, positive_int
from .generator import GeneratorConfig
from .io import write_json
from .bank import SharedLoRA
from .memory import FunctionalMemory
from .train import Trainer, TrainConfig


class ToyMLP(nn.Module):
    """Residual MLP: ``blocks.{i}.fc1`` (d -> 4d), ``blocks.{i}.fc2`` (4d -> d). Input (B, d)."""

    def __init__(self, dim: int = 32, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"fc1": nn.Linear(dim, 4 * dim), "fc2": nn.Linear(4 * dim, dim)})
                                    for _ in range(depth))

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block["fc2"](torch.tanh(block["fc1"](x)))
        return x


class ConflictingTasks:
    """``num_pairs`` pairs of opposite rank-2 updates of ``blocks.0.fc1``.

    ``batch(step, size)`` -> (condition (B, 1, cond_dim), x (B, d), target (B, d), task (B,)),
    deterministic in ``step``.
    """

    def __init__(self, base: ToyMLP, num_pairs: int = 2, cond_dim: int = 16, strength: float = 1.5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        base = copy.deepcopy(base)  # a teacher: later wrapping of the user's base leaves it alone
        fc1 = base.blocks[0]["fc1"]
        deltas = []
        for _ in range(num_pairs):
            u = torch.randn(fc1.out_features, 2, generator=g) / fc1.out_features ** 0.5
            v = torch.randn(2, fc1.in_features, generator=g) / fc1.in_features ** 0.5
            deltas += [strength * u @ v * 4, -strength * u @ v * 4]
        self.base, self.deltas, self.seed = base, torch.stack(deltas), seed
        self.embeddings = torch.randn(len(deltas), cond_dim, generator=g)
        self.dim = fc1.in_features

    @property
    def num_tasks(self) -> int:
        return len(self.deltas)

    @torch.no_grad()
    def target(self, x: Tensor, task: Tensor) -> Tensor:
        fc1 = self.base.blocks[0]["fc1"]
        out = torch.empty_like(x)
        for k in task.unique():
            rows = task == k
            weight = fc1.weight + self.deltas[k]
            h = x[rows]
            h = h + self.base.blocks[0]["fc2"](torch.tanh(nn.functional.linear(h, weight, fc1.bias)))
            for block in self.base.blocks[1:]:
                h = h + block["fc2"](torch.tanh(block["fc1"](h)))
            out[rows] = h
        return out

    def batch(self, step: int, size: int = 32):
        g = torch.Generator().manual_seed(self.seed * 100_003 + step)
        task = torch.randint(self.num_tasks, (size,), generator=g)
        x = torch.randn(size, self.dim, generator=g)
        cond = self.embeddings[task] + 0.05 * torch.randn(size, self.embeddings.shape[1], generator=g)
        return cond[:, None], x, self.target(x, task), task


# ---------------------------------------------------------------- funcmem toy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=positive_int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/toy")


def run_cli(args: argparse.Namespace) -> int:
    """Generator vs shared LoRA on the conflicting toy problem (the core's smallest demo)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; name a folder")
    out.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after training
    torch.manual_seed(args.seed)
    base = ToyMLP(32)
    tasks = ConflictingTasks(base, seed=args.seed)
    fm = FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16,
                          generator=GeneratorConfig(d_model=32, depth=1, head_dim=16, token_dim=32))
    shared = SharedLoRA(base, ["fc1", "fc2"], rank=64)

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
    write_json(out / "toy.json", result)
    print(json.dumps(result, indent=2))
    return 0
