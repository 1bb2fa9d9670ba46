"""Warm start: distil a trained bank of LoRAs into a generator before end-to-end training.

    bank = LoRABank(base, targets, rank, num=K)     # trained, one LoRA per task
    report = warm_start(fm, bank, conditions, index)  # fm.generate(conditions[i]) ~ bank LoRA index[i]
    Trainer(fm, loss_fn, ...).fit(batches)          # then end to end, as usual

What is matched is each target's update ``scale * B A``, not the factors (a LoRA's factors are
defined only up to an invertible r x r transform). The squared Frobenius distance of two updates
is computed from r x r Grams, never from the dense (out, in) products:

    ||B1 A1 - B2 A2||^2 = sum((B1^T B1) * (A1 A1^T)) - 2 sum((B1^T B2) * (A1 A2^T)) + sum((B2^T B2) * (A2 A2^T))

and the loss is that distance summed over targets, relative to the bank update's squared norm,
averaged over the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lora import LoRA
from .bank import LoRABank
from .memory import FunctionalMemory


def _gram_inner(a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F per sample (summed over experts): a (n, [E,] r, in), b (n, [E,] out, r) -> (n,)."""
    inner = (b1.transpose(-1, -2) @ b2) * (a1 @ a2.transpose(-1, -2))  # (n, [E,] r, r)
    return inner.flatten(1).sum(1)


def update_distance(lora: LoRA, target: LoRA) -> tuple[Tensor, Tensor]:
    """Per sample: sum over targets of ||s B A - s' B' A'||_F^2, and of ||s' B' A'||_F^2 (the
    reference's norm). Both LoRAs have one factor row per sample (no index) and the same targets.

    Shape: (n,), (n,).
    """
    dist, norm = 0, 0
    for name, (a, b) in lora.factors.items():
        ta, tb = target.factors[name]
        s, t = lora.scale, target.scale
        own = s * s * _gram_inner(a, b, a, b)
        cross = s * t * _gram_inner(a, b, ta, tb)
        ref = t * t * _gram_inner(ta, tb, ta, tb)
        dist = dist + own - 2 * cross + ref
        norm = norm + ref
    return dist, norm


def bank_rows(bank: LoRABank, index: Tensor) -> LoRA:
    """The bank's LoRAs ``index`` (n,) as a LoRA with one factor row per sample (detached)."""
    lora = bank.lora()
    return LoRA({k: (a.detach()[index], b.detach()[index]) for k, (a, b) in lora.factors.items()}, lora.scale)


@torch.no_grad()
def relative_error(memory: FunctionalMemory, bank: LoRABank, conditions: Tensor, index: Tensor | None = None,
                   mask: Tensor | None = None) -> Tensor:
    """Per condition: ||generated update - bank update|| / ||bank update|| over all targets (n,)."""
    index = torch.arange(conditions.shape[0]) if index is None else index
    dist, norm = update_distance(memory.generate(conditions, mask), bank_rows(bank, index.to(bank_device(bank))))
    return (dist.clamp(min=0) / norm.clamp(min=1e-30)).sqrt()


def bank_device(bank: LoRABank) -> torch.device:
    return next(iter(bank.lora_A.values())).device


def warm_start(memory: FunctionalMemory, bank: LoRABank, conditions: Tensor, index: Tensor | None = None,
               mask: Tensor | None = None, steps: int = 500, lr: float = 1e-3, batch: int = 64,
               tolerance: float = 0.0, seed: int = 0) -> dict:
    """Train ``memory``'s generator so that ``memory.generate(conditions[i])`` makes the updates of
    the bank's LoRA ``index[i]`` (every target's ``scale * B A``).

    Args:
        memory: the generator to warm-start (its base and targets must be the bank's targets;
            the bank may sit on its own copy of the base).
        bank: a trained ``LoRABank``.
        conditions: (n, L, condition_dim) or (n, condition_dim): the conditions that should call
            up the bank's LoRAs (the bank's keys: one per LoRA, or training conditions).
        index: (n,) the bank LoRA of each condition; default ``arange(n)`` (one condition per LoRA).
        mask: optional (n, L) key-padding mask of the conditions.
        steps, lr, batch: AdamW steps on the generator's parameters, its learning rate, and
            conditions per step (all of them when n <= batch).
        tolerance: stop early once the batch's mean relative squared error is below it.
        seed: draws the batches.

    Returns:
        ``{"steps": steps run, "relative_error": mean ||dW - dW_bank|| / ||dW_bank|| over all
        conditions at the end, "max_relative_error": the worst condition's}``.

    Raises:
        ValueError: the bank and the generator disagree on their targets or rank, or ``index``
            does not fit the conditions or the bank.
    """
    mine = {t.name: t.signature() for t in memory.targets}
    theirs = {t.name: t.signature() for t in bank.targets}
    if mine != theirs or memory.rank != bank.rank:
        raise ValueError(f"the bank (targets {sorted(theirs)[:4]}..., rank {bank.rank}) and the generator (targets "
                         f"{sorted(mine)[:4]}..., rank {memory.rank}) must have the same targets and rank")
    n = conditions.shape[0]
    index = torch.arange(n) if index is None else torch.as_tensor(index).long()
    if index.shape != (n,) or int(index.min()) < 0 or int(index.max()) >= bank.num:
        raise ValueError(f"index must be ({n},) with values in [0, {bank.num}), got {tuple(index.shape)} "
                         f"in [{int(index.min())}, {int(index.max())}]")
    params = [p for p in memory.generator.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    was_training = memory.training
    memory.train()
    done = 0
    for step in range(steps):
        rows = torch.arange(n) if n <= batch else torch.randperm(n, generator=g)[:batch]
        target = bank_rows(bank, index[rows].to(bank_device(bank)))
        lora = memory.generate(conditions[rows], None if mask is None else mask[rows])
        dist, norm = update_distance(lora, target)
        loss = (dist / norm.clamp(min=1e-30)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        done = step + 1
        if loss.item() < tolerance:
            break
    memory.train(was_training)
    errors = torch.cat([relative_error(memory, bank, conditions[s:s + batch], index[s:s + batch],
                                       None if mask is None else mask[s:s + batch]) for s in range(0, n, batch)])
    return {"steps": done, "relative_error": errors.mean().item(), "max_relative_error": errors.max().item()}
