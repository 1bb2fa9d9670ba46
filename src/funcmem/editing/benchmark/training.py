"""Training one method with the benchmark's shared settings, and building a fresh generator."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
from torch import Tensor

from ...train import Trainer, TrainConfig
from ...warm_start import warm_start
from ..methods import EditingMemory, mse_loss, padding_mask
from .config import BenchmarkConfig
from .sets import EditSet


class Timer:
    """Seconds spent per named stage (``with timer.stage(name): ...``), summed over repeats."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def train(method, data: EditSet, condition: str, cfg: BenchmarkConfig, lr: float, seed: int, name: str,
          callback=None, loss_fn=mse_loss):
    """Train one method with the shared settings; batches are a function of (seed, step)."""
    def batch_fn(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return data.batch(torch.randint(len(data), (cfg.batch,), generator=g).to(data.inputs.device), condition)

    warmup = max(1, cfg.steps // 20)
    trainer = Trainer(method, loss_fn, TrainConfig(steps=cfg.steps, lr=lr, warmup_steps=warmup, grad_clip=1.0,
                                                    description=name, log_every=max(1, cfg.steps // 20)))
    method.train()
    trainer.fit(batch_fn, callback=callback)
    method.eval()
    return trainer.history


def warm_start_from_bank(memory: EditingMemory, bank, data: EditSet, condition: str, cfg: BenchmarkConfig,
                         seed: int, n: int = 1024) -> dict:
    """Distil a trained bank into a fresh generator (``funcmem.warm_start``) before its training:
    on up to ``n`` single-edit training examples, the generated update for each example's condition is matched
    to the bank's LoRA of its edit. The projector stays at its initial map (it trains afterwards)."""
    g = torch.Generator().manual_seed(seed)
    singles = (data.second_ids.cpu() < 0).nonzero().flatten()  # a composition has no single bank LoRA to match
    idx = singles[torch.randperm(len(singles), generator=g)[:n]].to(data.inputs.device)
    batch = data.batch(idx, condition)
    with torch.no_grad():
        conditions = memory.condition(batch)
    return warm_start(memory.fm, bank, conditions, batch["edit_ids"], padding_mask(conditions),
                      steps=cfg.warm_start_steps, lr=cfg.warm_start_lr, seed=seed)


def matched_rank(memory_params: int, targets) -> int:
    """Smallest rank whose shared LoRA has at least ``memory_params`` trainable parameters."""
    per_rank = sum(t.in_features + t.out_features for t in targets)
    return max(1, math.ceil(memory_params / per_rank))


def make_memory(editor, train_raw: dict[str, Tensor], raw_dims, cfg: BenchmarkConfig, seed: int,
                **gen_changes) -> EditingMemory:
    """A fresh generator whose projector standardises with the training features' statistics."""
    torch.manual_seed(seed)
    rank = gen_changes.pop("rank", cfg.rank)
    gen_changes.setdefault("dim_accumulation", math.gcd(rank, cfg.generator["dim_accumulation"]))  # must divide r
    # The demo's head is narrower than its tokens (d = 24 < T = 64) on purpose, so no advice on it:
    # measured on the quick config with the label condition, T = 24 lost 1.0 dB at 3.6x the time per
    # step and dim_accumulation 1 lost 1.9 dB at 6x (docs/editing.md, "Generator fit").
    memory = EditingMemory.create(editor, raw_dims, cfg.targets, rank, cfg.alpha * rank / cfg.rank,
                                  cfg.condition_dim, cfg.generator_config(**gen_changes), advise=False).to(cfg.device)
    memory.projector.set_statistics(train_raw)
    return memory
