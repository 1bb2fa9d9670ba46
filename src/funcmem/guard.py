"""Guards at funcmem's boundaries: what goes into a generator, and what comes out of it.

    check_condition(condition, dim, like)  -> condition (B, L, dim), or a clear error
    check_mask(mask, condition)            -> key-padding mask (B, L) bool, or a clear error
    LoRAGuard()(lora, weight_norms)        -> lora with each update's norm bounded, or NonFiniteLoRAError

A generated LoRA can blow up a frozen base: one sample whose factors are huge (or NaN) changes
the base's output by as much. ``LoRAGuard`` bounds, per sample and per target, the Frobenius norm
of the update ``scale * B A`` without forming ``B A``:

    ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)) = sum((B^T B) * (A A^T))     r x r matrices

and scales B down so an update over the bound lands on it. ``FunctionalMemory.generate`` runs it
(``fm.guard``; set ``fm.guard = None`` to turn it off); ``Trainer`` skips a step whose LoRA,
loss or gradient is not finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .lora import LoRA


class NonFiniteLoRAError(FloatingPointError):
    """A generated LoRA holds NaN or Inf: the request fails instead of returning garbage."""


# ---------------------------------------------------------------- inputs


def check_condition(condition, dim: int, like: Tensor | None = None) -> Tensor:
    """Validate a condition at the API boundary; return it as (B, L, dim).

    Accepts (B, L, dim), (B, dim) (one token) and (B, 1, L, dim) (the HY-WU layout). A floating
    condition of another dtype is cast to ``like``'s dtype (outside autocast).

    Raises:
        TypeError: not a tensor, or not floating point.
        ValueError: wrong rank or width (the message gives the expected and actual shapes), an
            empty batch or sequence, NaN or Inf values (the message names the samples), or a
            device other than ``like``'s.
    """
    expected = f"(B, L, {dim}) or (B, {dim})"
    if not isinstance(condition, Tensor):
        raise TypeError(f"condition must be a tensor {expected}, got {type(condition).__name__}")
    shape = tuple(condition.shape)
    if not torch.is_floating_point(condition):
        raise TypeError(f"condition must be a floating tensor {expected}, got {condition.dtype} of shape {shape}")
    if condition.dim() == 4 and shape[1] == 1:
        condition = condition.squeeze(1)
    if condition.dim() == 2:
        condition = condition[:, None]
    if condition.dim() != 3:
        raise ValueError(f"condition must be {expected}, got {len(shape)}-D shape {shape}")
    if condition.shape[-1] != dim:
        raise ValueError(f"condition width must be {dim} (the generator's condition_dim): expected {expected}, "
                         f"got shape {shape}")
    if condition.shape[0] == 0 or condition.shape[1] == 0:
        raise ValueError(f"condition must have at least one sample and one token: expected {expected}, got shape {shape}")
    if like is not None and condition.device != like.device:
        raise ValueError(f"condition is on {condition.device} but the generator is on {like.device}: "
                         f"move it with condition.to({str(like.device)!r})")
    finite = torch.isfinite(condition).flatten(1).all(1)  # (B,)
    if not bool(finite.all()):
        bad = (~finite).nonzero().flatten().tolist()
        nan, inf = int(torch.isnan(condition).sum()), int(torch.isinf(condition).sum())
        raise ValueError(f"condition holds {nan} NaN and {inf} Inf values, in samples {bad[:10]} of "
                         f"{condition.shape[0]} (shape {shape})")
    if like is not None and condition.dtype != like.dtype and not torch.is_autocast_enabled(condition.device.type):
        condition = condition.to(like.dtype)
    return condition


# ---------------------------------------------------------------- outputs


def check_mask(mask, condition: Tensor) -> Tensor:
    """Validate a condition's key-padding mask: (B, L) bool (True = a real token), matching the
    checked condition (B, L, dim), with at least one real token per sample. Returns it on the
    condition's device.

    Raises:
        TypeError: not a bool tensor.
        ValueError: another shape, or a sample whose tokens are all padding.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (B, L), got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() == 3 and mask.shape[1] == 1:  # (B, 1, L), beside a (B, 1, L, dim) condition
        mask = mask.squeeze(1)
    if tuple(mask.shape) != tuple(condition.shape[:2]):
        raise ValueError(f"mask must be (B, L) = {tuple(condition.shape[:2])} like the condition, got {tuple(mask.shape)}")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"mask leaves samples {empty[:10]} without any real condition token")
    return mask.to(condition.device)


def update_norms(lora: LoRA) -> dict[str, Tensor]:
    """``||scale * B A||_F`` of every sample at every target, without forming ``B A``: {name: (n,)}.

    Experts count as one update (the norm over all E experts). Computed in float32.
    """
    out = {}
    for name, (a, b) in lora.factors.items():
        a, b = a.float(), b.float()  # (n, [E,] r, in), (n, [E,] out, r)
        gram_a = a @ a.transpose(-1, -2)  # (n, [E,] r, r)
        gram_b = b.transpose(-1, -2) @ b  # (n, [E,] r, r)
        squared = (gram_a * gram_b).flatten(1).sum(1)  # (n,) trace of the product: both are symmetric
        out[name] = abs(lora.scale) * squared.clamp(min=0).sqrt()
    return out


@dataclass
class LoRAGuard:
    """Bounds each generated update and refuses non-finite ones; counts how often it acts.

    Args:
        max_update_norm: bound on ``||scale * B A||_F`` per sample and target (None: none).
        max_relative_norm: bound as a multiple of the target weight's own ``||W||_F`` (None:
            none). The default, 100, is generous: trained generators in the tests make updates
            below 1x the weight's norm, untrained ones with a random B head (std 0.3) about 30x;
            it stops one that has blown up (updates of 1e3x and more, on the way to Inf).
        check_finite: raise ``NonFiniteLoRAError`` when a factor or the scale holds NaN or Inf.

    Counters (since construction or ``reset()``): ``checked`` samples, ``clipped`` (sample,
    target) updates scaled down, ``nonfinite`` LoRAs refused.

    A clipped update's B is multiplied by ``bound / norm`` (a constant for autograd), so its norm
    equals the bound; an update within the bound is returned untouched (bit for bit).
    """

    max_update_norm: float | None = None
    max_relative_norm: float | None = 100.0
    check_finite: bool = True
    checked: int = 0
    clipped: int = 0
    nonfinite: int = 0

    def reset(self) -> None:
        self.checked = self.clipped = self.nonfinite = 0

    def counters(self) -> dict[str, int]:
        return {"checked": self.checked, "clipped": self.clipped, "nonfinite": self.nonfinite}

    def bound(self, name: str, weight_norms: dict[str, float] | None) -> float | None:
        """The bound for one target: the smaller of the absolute and the relative one."""
        bounds = [] if self.max_update_norm is None else [float(self.max_update_norm)]
        if self.max_relative_norm is not None and weight_norms is not None and name in weight_norms:
            bounds.append(float(self.max_relative_norm) * weight_norms[name])
        return min(bounds) if bounds else None

    def __call__(self, lora: LoRA, weight_norms: dict[str, float] | None = None) -> LoRA:
        """Check and bound ``lora``; ``weight_norms`` ({target: ||W||_F}) enables the relative bound."""
        if self.check_finite and not math.isfinite(lora.scale):
            self.nonfinite += 1
            raise NonFiniteLoRAError(f"the LoRA's scale (alpha / rank) is {lora.scale}: every update would be "
                                     "NaN or Inf")
        names = list(lora.factors)
        flags = []  # one host read for everything below
        if self.check_finite:
            finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for n in names for t in lora.factors[n]])
            flags.append(finite.all(0).to(torch.float32))  # (n,) 1 where every factor of the sample is finite
        bounds = {n: self.bound(n, weight_norms) for n in names}
        factors = {}
        if any(b is not None for b in bounds.values()):
            with torch.no_grad():
                norms = update_norms(lora.detach())
                for n in names:
                    if bounds[n] is not None:
                        factors[n] = (bounds[n] / norms[n]).clamp(max=1.0).nan_to_num(1.0)  # (n,), 1 within bound
                        flags.append(factors[n])
        self.checked += lora.batch_size
        if not flags:
            return lora
        values = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
        if self.check_finite:
            bad = [i for i, ok in enumerate(values.pop(0)) if ok < 1]
            if bad:
                self.nonfinite += 1
                targets = [n for n in names if not all(bool(torch.isfinite(t).all()) for t in lora.factors[n])]
                raise NonFiniteLoRAError(f"the generated LoRA holds NaN or Inf in samples {bad[:10]} of "
                                         f"{lora.batch_size}, at targets {targets[:5]}")
        out = dict(lora.factors)
        for n, row in zip(list(factors), values):
            hits = sum(v < 1 for v in row)
            if hits:
                self.clipped += hits
                a, b = lora.factors[n]
                c = factors[n].to(b.dtype).view(-1, *[1] * (b.dim() - 1))
                out[n] = (a, b * c)
        return LoRA(out, lora.scale, lora.index)
