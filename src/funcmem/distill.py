"""Functional distillation: hold a generator's updates where they are for conditions it has
learnt, from stored condition vectors alone (no data). Nothing here knows what a condition means.

    store = ConditionStore()
    store.add(conditions, labels)                      # (n, L, condition_dim), (n,): kept as float16
    keep = FunctionalDistillation(fm, store, batch=16, seed=0)
    loss = task_loss + weight * keep(fm)               # while fm learns something new
    forget(fm, store, label, TrainConfig(steps=300))   # drive one label's updates to zero, keep the rest

The distance compares the updates factors make, not the factors: for one target it is
``||s B A - s' B' A'||_F^2``, computed from r x r products (``B A`` is never formed), so
``(B Q)(Q^-1 A)`` is the same update.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .lora import LoRA
from .train import Trainer, TrainConfig


def _inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F per sample through r x r matrices (B A is never formed).

    tr(A1^T B1^T B2 A2) = tr((B1^T B2)(A2 A1^T)). Shapes: B (n, ..., out, r), A (n, ..., r, in) -> (n,).
    """
    bb = b1.transpose(-1, -2) @ b2  # (n, ..., r, r)
    aa = a2 @ a1.transpose(-1, -2)  # (n, ..., r, r)
    return (bb * aa.transpose(-1, -2)).flatten(1).sum(1)


def product_sq_distance(new: LoRA, old: LoRA | None = None) -> Tensor:
    """Per sample, sum over targets of ||s B_new A_new - s B_old A_old||_F^2 (old None: the zero update).

    Compares the updates the factors make, not the factors: (B Q)(Q^-1 A) is the same update.
    Shape: (n,).
    """
    total = 0.0
    for name, (a, b) in new.factors.items():
        d = _inner(b, a, b, a) * new.scale ** 2
        if old is not None:
            a_old, b_old = old.factors[name]
            d = (d - 2 * new.scale * old.scale * _inner(b, a, b_old, a_old)
                 + old.scale ** 2 * _inner(b_old, a_old, b_old, a_old))
        total = total + d
    return total.clamp(min=0)


class ConditionStore:
    """Condition vectors (the generator's input) of a few earlier instances, with an integer label
    each (what they taught, e.g. a task id); float16. ``nbytes`` is what keeping it costs."""

    def __init__(self):
        self.conditions: Tensor | None = None  # (n, L, condition_dim) float16
        self.labels: Tensor | None = None  # (n,) uint8

    def __len__(self) -> int:
        return 0 if self.conditions is None else len(self.conditions)

    def add(self, conditions: Tensor, labels: Tensor) -> None:
        """conditions (n, L, condition_dim), labels (n,) integers in [0, 255]."""
        if labels.numel() and (labels.min() < 0 or labels.max() > 255):
            raise ValueError(f"labels must lie in [0, 255] (stored as uint8), got {labels.min()}..{labels.max()}")
        conditions, labels = conditions.detach().half(), labels.to(torch.uint8)
        if self.conditions is None:
            self.conditions, self.labels = conditions, labels
        else:
            self.conditions = torch.cat([self.conditions, conditions])
            self.labels = torch.cat([self.labels, labels])

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.conditions is None else {"conditions": self.conditions, "labels": self.labels}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def _device(fm: nn.Module) -> torch.device:
    return next(fm.generator.parameters()).device


@torch.no_grad()
def generate_all(fm: nn.Module, conditions: Tensor, chunk: int = 64) -> LoRA:
    """``fm.generate`` on stored conditions (float16 -> float32), in chunks, detached."""
    dev = _device(fm)
    return LoRA.cat([fm.generate(conditions[i:i + chunk].float().to(dev)).detach()
                     for i in range(0, len(conditions), chunk)])


class FunctionalDistillation:
    """The distance of a generator's updates for stored conditions from the updates it made when
    this object was built, normalised by their mean squared norm.

    Each call draws ``batch`` stored conditions (from its own seeded RNG) and returns the mean
    ``product_sq_distance`` to their recorded updates: a scalar to add to a training loss.
    """

    def __init__(self, fm: nn.Module, store: ConditionStore, batch: int, seed: int):
        if not len(store):
            raise ValueError("the condition store is empty: nothing to distil")
        self.store, self.batch = store, batch
        self.old = generate_all(fm, store.conditions)
        self.norm = product_sq_distance(self.old).mean().clamp(min=1e-12)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, fm: nn.Module) -> Tensor:
        idx = torch.randint(len(self.store), (self.batch,), generator=self.rng)
        new = fm.generate(self.store.conditions[idx].float().to(_device(fm)))
        return product_sq_distance(new, self.old[idx]).mean() / self.norm


def forget(fm: nn.Module, store: ConditionStore, label: int, config: TrainConfig, batch: int = 16,
           seed: int = 0) -> list[dict]:
    """Fine-tune the generator so that ``label``'s stored conditions yield a zero update, while every
    other stored condition keeps the update it has now. Uses the store only (no data).

    Each step draws ``batch`` kept and ``batch`` removed conditions (a function of ``seed`` and the
    step). Returns the trainer's history (losses ``keep`` and ``zero``).
    """
    removed = (store.labels == label).nonzero().flatten()
    kept = (store.labels != label).nonzero().flatten()
    if not len(removed):
        raise ValueError(f"the condition store holds no condition labelled {label}")
    old = generate_all(fm, store.conditions)
    norm = product_sq_distance(old).mean().clamp(min=1e-12)
    device = _device(fm)

    def batch_fn(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = lambda pool: pool[torch.randint(len(pool), (batch,), generator=g)] if len(pool) else pool
        return pick(kept), pick(removed)

    def loss_fn(model, pair):
        keep_idx, removed_idx = pair
        new_keep = model.generate(store.conditions[keep_idx].float().to(device))
        new_removed = model.generate(store.conditions[removed_idx].float().to(device))
        keep = product_sq_distance(new_keep, old[keep_idx]).mean() / norm if len(kept) else torch.zeros((), device=device)
        zero = product_sq_distance(new_removed).mean() / norm
        return keep + zero, {"keep": keep.detach(), "zero": zero.detach()}

    trainer = Trainer(fm, loss_fn, config)
    trainer.fit(batch_fn)
    fm.eval()
    return trainer.history
