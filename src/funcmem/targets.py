"""Choosing target modules: pattern matching over ``named_modules()`` and the layer x slot grid.

A *target* is one weight that receives LoRA:

- an ``nn.Linear`` (weight (out, in));
- an ``nn.Conv2d`` with ``groups == 1`` (LoRA as PEFT does it: A is a conv with the base kernel
  and r output channels, B a 1x1 conv);
- stacked expert weights: a 3-D parameter (E, out, in) held directly by a module, named
  ``{module}.{parameter}``, e.g. ``layers.0.mlp.experts.gate_up_proj``; LoRA per expert.

Patterns follow PEFT: a list of glob patterns (``"blocks.*.attn.qkv"``) or module-name suffixes
(``"qkv"`` matches every name that is ``qkv`` or ends in ``.qkv``), or one regex string matched
against the whole name. Targets are grouped into base-model *layers* (the path up to its last
number, ``blocks.3``) and *slots* (the rest, ``attn.qkv``).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from .layers.base import LoRALayer

Patterns = str | list[str] | tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One weight that receives LoRA.

    ``in_features`` is the width LoRA's A reads (in_channels * kh * kw for a conv);
    ``num_experts`` is None except for stacked expert weights.
    """

    name: str
    kind: str  # "linear" | "conv2d" | "experts"
    in_features: int
    out_features: int
    num_experts: int | None = None

    @property
    def layer(self) -> str:
        return split_layer(self.name)[0]

    @property
    def slot(self) -> str:
        return split_layer(self.name)[1]

    @property
    def owner(self) -> str:
        """Path of the module that holds the weight (and is wrapped): the name itself, or for
        stacked expert weights the name without its last part."""
        return self.name.rpartition(".")[0] if self.kind == "experts" else self.name

    @property
    def weight_name(self) -> str:
        """The weight's parameter name inside its module: ``weight``, or the experts' own name."""
        return self.name.rpartition(".")[2] if self.kind == "experts" else "weight"

    def a_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of one sample's A factor."""
        core = (rank, self.in_features)
        return core if self.num_experts is None else (self.num_experts, *core)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of one sample's B factor."""
        core = (self.out_features, rank)
        return core if self.num_experts is None else (self.num_experts, *core)

    def signature(self) -> list:
        """What must match between a saved generator and a base it is loaded onto."""
        return [self.kind, self.in_features, self.out_features, self.num_experts]


def split_layer(name: str) -> tuple[str, str]:
    """``"blocks.3.attn.qkv"`` -> ``("blocks.3", "attn.qkv")``; no number -> ``("", name)``."""
    parts = name.split(".")
    numeric = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numeric or numeric[-1] == len(parts) - 1:
        return "", name
    cut = numeric[-1] + 1
    return ".".join(parts[:cut]), ".".join(parts[cut:])


def exact(names: list[str]) -> str:
    """One regex pattern that matches exactly these names (no suffix or glob matching)."""
    return "|".join(re.escape(n) for n in names)


def _matches(name: str, patterns: Patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    for p in patterns:
        if any(c in p for c in "*?["):
            if fnmatch.fnmatchcase(name, p):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def unwrap(module: nn.Module) -> nn.Module:
    """A funcmem wrapper stands for its base layer."""
    return module.base_layer if isinstance(module, LoRALayer) else module


def _stacked(module: nn.Module) -> list[str]:
    """Names of the module's own 3-D parameters (stacked expert weights)."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def describe(name: str, module: nn.Module, weight: str | None) -> list[Target] | str:
    """The targets a matched name stands for, else the reason it cannot take LoRA."""
    if weight is not None:
        e, out_f, in_f = module.get_parameter(weight).shape
        return [Target(name, "experts", in_f, out_f, e)]
    if isinstance(module, nn.Linear):
        return [Target(name, "linear", module.in_features, module.out_features)]
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"Conv2d with groups={module.groups} (only groups=1 takes LoRA)"
        if module.padding_mode != "zeros":
            return f"Conv2d with padding_mode={module.padding_mode!r} (only 'zeros' takes LoRA)"
        kh, kw = module.kernel_size
        return [Target(name, "conv2d", module.in_channels * kh * kw, module.out_channels)]
    if _stacked(module):  # a module holding expert weights stands for all of them
        return [t for w in _stacked(module) for t in describe(f"{name}.{w}", module, w)]
    return f"{type(module).__name__} (LoRA takes nn.Linear, nn.Conv2d or stacked (E, out, in) expert weights)"


def candidates(model: nn.Module) -> dict[str, tuple[nn.Module, str | None]]:
    """Every name a pattern may match -> (module, weight name for stacked expert weights or None).

    Modules inside funcmem wrappers are hidden; a wrapper stands for its base layer.
    """
    out: dict[str, tuple[nn.Module, str | None]] = {}
    wrappers: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(w + ".") for w in wrappers):
            continue
        if isinstance(module, LoRALayer):
            wrappers.append(name)
        module = unwrap(module)
        out[name] = (module, None)
        for w in _stacked(module):
            out[f"{name}.{w}"] = (module, w)
    return out


def resolve_targets(model: nn.Module, targets: Patterns, exclude: Patterns | None = None) -> list[Target]:
    """Resolve patterns to targets, in ``named_modules()`` order.

    Raises:
        ValueError: a pattern matches nothing (the message lists the names that exist), or a
            matched module holds weights but cannot take LoRA (the message says why).
    """
    if not targets:
        raise ValueError("targets is empty: give patterns such as ['qkv', 'fc1'] or a regex string")
    names = candidates(model)
    listing = ", ".join(names)
    patterns = [targets] if isinstance(targets, str) else list(targets)
    for p in patterns:
        if not any(_matches(n, p if isinstance(targets, str) else [p]) for n in names):
            raise ValueError(f"target pattern {p!r} matched no module. Module names are: {listing}")
    resolved: dict[str, Target] = {}
    refused = []
    for name, (module, weight) in names.items():
        if not _matches(name, targets) or (exclude and _matches(name, exclude)):
            continue
        described = describe(name, module, weight)
        if isinstance(described, str):
            if any(True for _ in module.parameters(recurse=False)):
                refused.append(f"{name}: {described}")
            continue
        for t in described:
            if not (exclude and _matches(t.name, exclude)):
                resolved.setdefault(t.name, t)
    if refused:
        raise ValueError("these matched modules cannot take LoRA (narrow the patterns or use exclude=):\n  "
                         + "\n  ".join(refused))
    if not resolved:
        raise ValueError(f"target patterns {targets!r} (exclude={exclude!r}) left no module. Module names are: {listing}")
    return list(resolved.values())


def group_layers(targets: list[Target]) -> tuple[list[str], list[str]]:
    """Layer keys and slot names, each in order of first appearance."""
    layers, slots = [], []
    for t in targets:
        if t.layer not in layers:
            layers.append(t.layer)
        if t.slot not in slots:
            slots.append(t.slot)
    return layers, slots
