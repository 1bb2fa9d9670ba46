"""Functional distillation: hold a generator's updates where they are for conditions it has
learnt, from stored condition vectors alone (no data). Nothing here knows what a condition means.

    store = ConditionStore()
    store.add(conditions, labels)                      # (n, L, condition_dim), (n,): kept as float16
    keep = FunctionalDistillation(fm, store, batch=16, seed=0)
    loss = task_loss + weight * keep(fm)               # while fm learns something new
    forget(fm, store, [label], TrainConfig(steps=300))  # drive labels' updates to zero, keep the rest
    forget(..., near=Neighbourhood(label_positions, recombine=True))  # ... and near the stored ones too
    relearn(fm, store, [label], recorded, TrainConfig(steps=300))  # undo, from the updates recorded before

``fm`` is anything with ``generate(conditions) -> LoRA`` whose trainable parameters make it: a
``FunctionalMemory``, or a wrapper that generates the way its users do (e.g. masking padded condition
tokens): the updates kept or removed are those ``fm.generate`` makes, so it must be the same call.

The distance compares the updates factors make, not the factors: for one target it is
``||s B A - s' B' A'||_F^2``, computed from r x r products (``B A`` is never formed), so
``(B Q)(Q^-1 A)`` is the same update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

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
    return next(fm.parameters()).device


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


# ------------------------------------------------------------------ removing and re-teaching labels


@dataclass
class Neighbourhood:
    """Conditions near the stored ones, derived from the store alone, so that a removal holds for
    more than the stored vectors. Each draw starts from a stored condition of the wanted side
    (removed or kept) and applies, in this order:

    - ``recombine``: its ``context`` positions (those not in ``label_positions``: what the label acts
      on, e.g. an instance's own tokens) replaced by those of a stored condition of any label;
    - ``mix``: its label positions moved a fraction ``u ~ U(0, mix)`` towards those of another stored
      condition of the same label (between the label's stored wordings);
    - ``direction``: its label positions moved ``t ~ U(0, direction)`` along its label's direction
      (its label's mean minus the store's mean, per position);
    - ``noise``: Gaussian noise on its real (non-zero) label positions, ``noise`` x the store's
      per-feature std;
    - ``drop``: each real label position zeroed with probability ``drop`` (zero = padding).

    ``label_positions`` (L,) bool marks the positions that say which label (the instruction);
    None: every position (then ``recombine`` does nothing).
    """

    label_positions: Tensor | None = None
    recombine: bool = False
    mix: float = 0.0
    direction: float = 0.0
    noise: float = 0.0
    drop: float = 0.0

    def sample(self, conditions: Tensor, labels: Tensor, idx: Tensor, g: torch.Generator) -> Tensor:
        """Conditions (len(idx), L, dim) float32 near ``conditions[idx]``; a function of ``g``'s state."""
        c = conditions.float()
        n, L = len(idx), c.shape[1]
        pos = (torch.ones(L, dtype=torch.bool) if self.label_positions is None
               else self.label_positions.cpu().bool())[None, :, None]  # (1, L, 1)
        x = c[idx].clone()
        if self.recombine:
            x = torch.where(pos, x, c[torch.randint(len(c), (n,), generator=g)])
        if self.mix:
            same = torch.stack([_draw_same(labels, labels[i], g) for i in idx.tolist()])
            u = torch.rand(n, 1, 1, generator=g) * self.mix
            x = torch.where(pos, x + u * (c[same] - x), x)
        if self.direction:
            mean = c.mean(0)
            shift = torch.stack([c[labels == labels[i]].mean(0) - mean for i in idx.tolist()])
            x = torch.where(pos, x + torch.rand(n, 1, 1, generator=g) * self.direction * shift, x)
        real = pos & (x.abs().sum(-1, keepdim=True) > 0)
        if self.noise:
            std = c.reshape(-1, c.shape[-1]).std(0)
            x = torch.where(real, x + self.noise * std * torch.randn(x.shape, generator=g), x)
        if self.drop:
            x = torch.where(real & (torch.rand(n, L, 1, generator=g) < self.drop), torch.zeros(()), x)
        return x


def scaled(lora: LoRA, factor: Tensor) -> LoRA:
    """Each sample's update times ``factor`` ((n,)): its B factors scaled."""
    shape = lambda b: (-1, *[1] * (b.dim() - 1))  # noqa: E731
    return LoRA({k: (a, b * factor.view(shape(b))) for k, (a, b) in lora.factors.items()}, lora.scale)


def _draw_same(labels: Tensor, label: Tensor, g: torch.Generator) -> Tensor:
    pool = (labels == label).nonzero().flatten()
    return pool[torch.randint(len(pool), (), generator=g)]


def _label_index(store: ConditionStore, labels) -> Tensor:
    labels = [int(labels)] if isinstance(labels, int) else [int(x) for x in labels]
    missing = [x for x in labels if not (store.labels == x).any()]
    if missing or not labels:
        raise ValueError(f"the condition store holds no condition labelled {missing or labels}")
    return torch.isin(store.labels, torch.tensor(labels, dtype=store.labels.dtype))


def _check_goals(targets: LoRA | None, near: Neighbourhood | None, gate) -> None:
    if near is not None and targets is not None:
        raise ValueError("a neighbourhood has no known target update: use it to remove (targets None)")
    if gate is not None and near is None:
        raise ValueError("a gate judges conditions drawn near the store: give a neighbourhood too")


def retarget(fm: nn.Module, store: ConditionStore, moved: Tensor, config: TrainConfig, targets: LoRA | None = None,
             batch: int = 16, seed: int = 0, near: Neighbourhood | None = None,
             gate: Callable[[LoRA], Tensor] | None = None) -> list[dict]:
    """Fine-tune the generator so that the stored conditions ``moved`` ((n,) bool) yield ``targets``
    (a LoRA with one sample per moved condition; None: the zero update) while every other stored
    condition keeps the update it has now. Uses the store only (no data).

    With ``near``, both sides are drawn from the neighbourhood of their stored conditions: kept ones
    hold the update the generator made before this call (a frozen copy is the teacher), moved ones go
    to zero (``near`` needs ``targets`` None). Each step draws ``batch`` kept and ``batch`` moved
    conditions (a function of ``seed`` and the step). Returns the trainer's history (losses ``keep``
    and ``move``).

    ``gate`` (with ``near``): updates -> (n,) shares in [0, 1] judged from the update itself (e.g. how
    much it acts like the moved labels); a drawn kept condition's goal is its teacher update x (1 - gate).
    """
    _check_goals(targets, near, gate)
    moved_idx, kept = moved.nonzero().flatten(), (~moved).nonzero().flatten()
    device = _device(fm)
    teacher = None if near is None else copy.deepcopy(fm).requires_grad_(False).eval()
    old = generate_all(fm, store.conditions)
    norm = product_sq_distance(old).mean().clamp(min=1e-12)
    labels, moved_dev = store.labels.long(), moved.to(device)

    def draw(pool: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = pool[torch.randint(len(pool), (batch,), generator=g)] if len(pool) else pool
        return idx, (store.conditions[idx].float() if near is None else near.sample(store.conditions, labels, idx, g))

    def batch_fn(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        (ki, kc), (mi, mc) = draw(kept, g), draw(moved_idx, g)
        return torch.cat([ki, mi]), torch.cat([kc, mc]).to(device)

    @torch.no_grad()
    def goals(idx: Tensor, c: Tensor) -> tuple[LoRA, Tensor]:
        """Per drawn condition: the update it keeps and whether it moves instead."""
        moving = moved_dev[idx.to(device)]
        if near is not None:
            want = teacher.generate(c)
            return (want if gate is None else scaled(want, 1 - gate(want).to(device))), moving
        if targets is None:
            return old[idx], moving
        on = moved[idx]  # drawn kept first, then moved
        return LoRA.cat([old[idx[~on]], targets[torch.searchsorted(moved_idx, idx[on])]]), moving

    def loss_fn(model, drawn):
        idx, c = drawn
        want, moving = goals(idx, c)
        new = model.generate(c)
        zero = torch.zeros((), device=device)
        to_want = product_sq_distance(new, want) / norm
        to_zero = product_sq_distance(new) / norm if targets is None else to_want
        keep = to_want[~moving].mean() if (~moving).any() else zero
        move = to_zero[moving].mean() if moving.any() else zero
        return keep + move, {"keep": keep.detach(), "move": move.detach()}

    trainer = Trainer(fm, loss_fn, config)
    trainer.fit(batch_fn)
    fm.eval()
    return trainer.history


def forget(fm: nn.Module, store: ConditionStore, labels: int | list[int], config: TrainConfig, batch: int = 16,
           seed: int = 0, near: Neighbourhood | None = None, gate: Callable[[LoRA], Tensor] | None = None) -> list[dict]:
    """Drive one or several labels' updates to zero, keeping every other stored condition's update
    (``retarget``; with ``near``, on the neighbourhood of the stored conditions too; with ``gate``,
    the kept side's drawn conditions lose the share of their update the gate gives)."""
    return retarget(fm, store, _label_index(store, labels), config, None, batch, seed, near, gate)


def relearn(fm: nn.Module, store: ConditionStore, labels: int | list[int], updates: LoRA, config: TrainConfig,
            batch: int = 16, seed: int = 0) -> list[dict]:
    """Undo a removal: bring the labels' stored conditions back to ``updates`` (``generate_all`` of
    them, in store order, recorded before ``forget``), keeping the other stored conditions."""
    moved = _label_index(store, labels)
    if len(updates) != int(moved.sum()):
        raise ValueError(f"{len(updates)} recorded updates for {int(moved.sum())} stored conditions")
    return retarget(fm, store, moved, config, updates, batch, seed)
