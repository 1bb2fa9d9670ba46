"""Mounting LoRA factors on a frozen base: wrappers that keep ``base_layer`` and add the update.

Inside ``mounted(...)`` every target computes ``base_layer(x) + scale * B_i (A_i x)`` with sample
i's own factors. The LoRA batch n and the input batch b relate as:

- n == b: sample i uses factors i;
- n divides b: sample i uses factors ``i % n`` (the way ``torch.cat([x, x])`` builds
  classifier-free-guidance copies), without repeating the factors in memory; n == 1 broadcasts;
- anything else is an error naming both sizes.

Outside ``mounted(...)`` a wrapper returns exactly ``base_layer(x)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .lora import LoRA
from .targets import Target

Factors = tuple[Tensor, Tensor, float]  # A, B, scale


def tiles(lora_batch: int, input_batch: int, where: str) -> int:
    """How many times the LoRA batch repeats over the input batch (k with b = k * n)."""
    if input_batch % lora_batch:
        raise ValueError(f"{where}: LoRA batch {lora_batch} does not divide the input batch {input_batch} "
                         "(use one LoRA per sample, one for all, or a divisor for CFG-style copies)")
    return input_batch // lora_batch


class LoRALayer(nn.Module):
    """A wrapper around one base module; ``factors`` maps a weight name to its mounted factors."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.factors: dict[str, Factors] = {}
        self._merged: dict[str, Tensor] = {}  # original weights while merged

    def weight_delta(self, name: str, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """``scale * B @ A`` of one sample, shaped like the base weight."""
        raise NotImplementedError

    def merge(self, name: str, a: Tensor, b: Tensor, scale: float) -> None:
        """Fold one sample's factors (batch 1) into the base weight."""
        weight = self.base_layer.get_parameter(name)
        if name in self._merged:
            raise RuntimeError("already merged: unmerge() first")
        self._merged[name] = weight.detach().clone()
        with torch.no_grad():
            weight += self.weight_delta(name, a[0], b[0], scale).to(weight.dtype)

    def unmerge(self) -> None:
        """Restore the weights saved at merge, bit for bit."""
        with torch.no_grad():
            for name, original in self._merged.items():
                self.base_layer.get_parameter(name).copy_(original)
        self._merged.clear()


class _WeightedLoRA(LoRALayer):
    """Wrappers of layers with one ``weight``: expose it (and ``bias``) as PEFT's layers do."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


class LinearLoRA(_WeightedLoRA):
    """LoRA on ``nn.Linear``; input (b, ..., in_features)."""

    def weight_delta(self, name, a, b, scale):
        return scale * (b @ a)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if "weight" not in self.factors:
            return y
        a, b, scale = self.factors["weight"]
        n = a.shape[0]
        k = tiles(n, x.shape[0], "Linear")
        xs = x.reshape(k, n, -1, x.shape[-1])  # sample i = (i // n, i % n)
        h = xs @ a.to(x.dtype).transpose(-1, -2)  # (k, n, T, r)
        delta = (h * scale) @ b.to(x.dtype).transpose(-1, -2)  # (k, n, T, out)
        return y + delta.reshape(y.shape)


class Conv2dLoRA(_WeightedLoRA):
    """LoRA on ``nn.Conv2d`` as PEFT does it: A a conv with the base kernel, B a 1x1 conv.

    Input (b, C, H, W); A (n, r, C*kh*kw) is used as conv weights (n*r, C, kh, kw) in one grouped
    convolution over the n samples' channel blocks.
    """

    def weight_delta(self, name, a, b, scale):
        conv = self.base_layer
        return scale * (b @ a).view(conv.out_channels, conv.in_channels, *conv.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if "weight" not in self.factors:
            return y
        if x.dim() != 4:
            raise ValueError(f"Conv2d LoRA needs a batched input (b, C, H, W), got {tuple(x.shape)}")
        a, b, scale = self.factors["weight"]
        conv, (n, r) = self.base_layer, a.shape[:2]
        k = tiles(n, x.shape[0], "Conv2d")
        wa = a.to(x.dtype).reshape(n * r, conv.in_channels, *conv.kernel_size)
        h = F.conv2d(x.reshape(k, n * conv.in_channels, *x.shape[2:]), wa, None,
                     conv.stride, conv.padding, conv.dilation, groups=n)  # (k, n*r, H', W')
        h = h.view(k, n, r, -1) * scale
        delta = b.to(x.dtype) @ h  # (n, out, r) @ (k, n, r, HW) -> (k, n, out, HW)
        return y + delta.reshape(y.shape)


class ExpertsLoRA(LoRALayer):
    """LoRA per expert on stacked expert weights (E, out, in) of any module.

    The module's own forward runs with ``W + scale * B_e A_e`` swapped in (``functional_call``);
    with several LoRAs in a batch it runs once per distinct LoRA on that LoRA's samples (tensor
    arguments whose first dimension is the batch are split, the output is stitched back).
    """

    def weight_delta(self, name, a, b, scale):
        return scale * (b @ a)  # (E, out, r) @ (E, r, in)

    def _weights(self, j: int) -> dict[str, Tensor]:
        return {name: self.base_layer.get_parameter(name) + self.weight_delta(name, a[j], b[j], s).to(
            self.base_layer.get_parameter(name).dtype) for name, (a, b, s) in self.factors.items()}

    def forward(self, *args, **kwargs):
        if not self.factors:
            return self.base_layer(*args, **kwargs)
        n = next(iter(self.factors.values()))[0].shape[0]
        if n == 1:
            return functional_call(self.base_layer, self._weights(0), args, kwargs)
        batch = args[0].shape[0]
        tiles(n, batch, "experts")
        out = None
        for j in range(n):
            rows = torch.arange(j, batch, n, device=args[0].device)
            pick = lambda v: v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v
            part = functional_call(self.base_layer, self._weights(j), tuple(map(pick, args)),
                                   {key: pick(v) for key, v in kwargs.items()})
            out = part.new_empty(batch, *part.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, part)
        return out


WRAPPERS = {"linear": LinearLoRA, "conv2d": Conv2dLoRA, "experts": ExpertsLoRA}


def _owner_and_weight(target: Target) -> tuple[str, str]:
    """Module path of the wrapper and the weight name inside its base layer."""
    if target.kind == "experts":
        owner, _, weight = target.name.rpartition(".")
        return owner, weight
    return target.name, "weight"


def inject(model: nn.Module, targets: list[Target]) -> dict[str, tuple[LoRALayer, str]]:
    """Wrap every target's module (once; existing funcmem wrappers are reused).

    Returns: target name -> (wrapper, weight name inside ``wrapper.base_layer``).
    """
    handles = {}
    for t in targets:
        owner, weight = _owner_and_weight(t)
        module = model.get_submodule(owner)
        if not isinstance(module, LoRALayer):
            parent_name, _, child = owner.rpartition(".")
            module = WRAPPERS[t.kind](module)
            setattr(model.get_submodule(parent_name), child, module)
        handles[t.name] = (module, weight)
    return handles


@contextmanager
def mounted(handles: dict[str, tuple[LoRALayer, str]], lora: LoRA):
    """Mount ``lora`` on the wrapped targets for the duration of the block."""
    missing = [name for name in handles if name not in lora.factors]
    if missing:
        raise KeyError(f"the LoRA has no factors for targets {missing[:5]}")
    busy = [name for name, (w, weight) in handles.items() if weight in w.factors]
    if busy:
        raise RuntimeError(f"a LoRA is already mounted on {busy[:3]}; leave that block first")
    try:
        for name, (wrapper, weight) in handles.items():
            a, b = lora.factors[name]
            wrapper.factors[weight] = (a, b, lora.scale)
        yield
    finally:
        for wrapper, weight in handles.values():
            wrapper.factors.pop(weight, None)


def merge(handles: dict[str, tuple[LoRALayer, str]], lora: LoRA) -> None:
    """Fold one sample's factors into the base weights (see ``unmerge``)."""
    if lora.batch_size != 1:
        raise ValueError(f"merge takes the LoRA of one sample (batch 1), got batch {lora.batch_size}; use lora[i]")
    for name, (wrapper, weight) in handles.items():
        a, b = lora.factors[name]
        wrapper.merge(weight, a.detach(), b.detach(), lora.scale)


def unmerge(handles: dict[str, tuple[LoRALayer, str]]) -> None:
    for wrapper, _ in handles.values():
        wrapper.unmerge()
