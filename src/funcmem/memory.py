"""The user-facing objects: ``FunctionalMemory`` (a generator of per-instance LoRA) and
``SharedLoRA`` (one static LoRA, the baseline), both mounted through the same wrappers.

    condition (B, L, condition_dim) --generator--> tokens (B, N, H, r, T) --detokenize--> LoRA
    LoRA --mounted--> base(x) with scale * B_i (A_i x) added at every target, per sample i
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from . import mount
from .generator import GeneratorConfig, ParameterGenerator
from .io import read_safetensors, write_json, write_safetensors
from .lora import LoRA
from .targets import Patterns, Target, resolve_targets
from .tokens import TokenLayout

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def _version() -> str:
    from . import __version__

    return __version__


class _Mountable(nn.Module):
    """What both objects share: a frozen base with wrapped targets, mounting, merging."""

    def __init__(self, base: nn.Module, targets: Patterns, rank: int, alpha: float | None, exclude: Patterns | None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        base.requires_grad_(False)
        self.base = base
        self.target_patterns, self.exclude = targets, exclude
        self.rank, self.alpha = rank, float(alpha if alpha is not None else rank)
        self.targets: list[Target] = resolve_targets(base, targets, exclude)
        self._handles = mount.inject(base, self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @contextmanager
    def mounted(self, lora: LoRA):
        """Inside the block every target adds ``scale * B_i (A_i x)`` for sample i."""
        with mount.mounted(self._handles, lora):
            yield self.base

    def merge(self, lora: LoRA) -> None:
        """Fold one sample's LoRA (``lora[i]``) into the base weights for fast single-instance use."""
        mount.merge(self._handles, lora)

    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before ``merge``."""
        mount.unmerge(self._handles)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def lora_parameters_per_instance(self) -> int:
        """How many LoRA numbers one instance carries (over all targets)."""
        return sum(math.prod(t.a_shape(self.rank)) + math.prod(t.b_shape(self.rank)) for t in self.targets)

    def _target_config(self) -> dict:
        return {"funcmem_version": _version(), "targets": self.target_patterns, "exclude": self.exclude,
                "rank": self.rank, "alpha": self.alpha,
                "resolved_targets": {t.name: t.signature() for t in self.targets}}

    def _check_targets(self, saved: dict, path) -> None:
        """A saved config must describe this base's targets, shape for shape."""
        mine = {t.name: t.signature() for t in self.targets}
        for name, sig in saved.items():
            if name not in mine:
                raise ValueError(f"{path} was saved for a base with target {name!r}, which this base lacks "
                                 f"(it has {list(mine)[:6]}...)")
            if mine[name] != list(sig):
                raise ValueError(f"{path}: target {name!r} is [kind, in, out, experts] = {list(sig)} in the "
                                 f"checkpoint but {mine[name]} in this base")
        extra = [n for n in mine if n not in saved]
        if extra:
            raise ValueError(f"{path}: this base has targets the checkpoint lacks: {extra[:6]}")

    def _save(self, path, config: dict, weights: dict[str, Tensor]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / WEIGHTS_NAME, weights, metadata={"format": "pt", "funcmem_version": _version()})
        write_json(path / CONFIG_NAME, config)


def _read_config(path, kind: str) -> dict:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a funcmem directory")
    config = json.loads(file.read_text())
    if config.get("funcmem_type") != kind:
        raise ValueError(f"{path} holds a {config.get('funcmem_type')!r}, not a {kind!r}")
    return config


class FunctionalMemory(_Mountable):
    """A trained generator of per-instance LoRA for a frozen base.

    Args:
        base: any ``nn.Module``; this call freezes it and wraps its targets.
        targets: glob patterns / name suffixes over ``named_modules()`` names, or one regex.
        rank, alpha: LoRA rank and alpha (scale = alpha / rank).
        condition_dim: width of the condition vectors.
        generator: generator size.
        exclude: patterns of modules to leave out.

    Shape:
        condition: (B, L, condition_dim) or (B, condition_dim).
    """

    def __init__(self, base: nn.Module, targets: Patterns, rank: int = 8, alpha: float | None = None,
                 condition_dim: int = 384, generator: GeneratorConfig | None = None, exclude: Patterns | None = None):
        super().__init__(base, targets, rank, alpha, exclude)
        self.condition_dim = condition_dim
        self.generator_config = generator or GeneratorConfig()
        self.layout = TokenLayout.from_targets(self.targets, rank, self.generator_config.token_dim)
        self.generator = ParameterGenerator(self.generator_config, condition_dim, self.layout.num_layers,
                                            self.layout.tokens_per_layer, self.layout.h_a, rank)

    def generate(self, condition: Tensor) -> LoRA:
        """condition (B, L, condition_dim) -> per-sample LoRA (batch B)."""
        if not torch.is_floating_point(condition):
            raise TypeError(f"condition must be a floating tensor, got {condition.dtype}")
        return self.layout.detokenize(self.generator(condition), self.scale)

    def forward(self, condition: Tensor, *args, **kwargs):
        """Generate, mount and call the base: ``base(*args, **kwargs)`` with per-sample LoRA."""
        with self.mounted(self.generate(condition)):
            return self.base(*args, **kwargs)

    def config(self) -> dict:
        return {"funcmem_type": "FunctionalMemory", **self._target_config(), "condition_dim": self.condition_dim,
                "generator": self.generator_config.to_dict()}

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the generator's weights) to a directory."""
        self._save(path, self.config(), self.generator.state_dict())

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "FunctionalMemory":
        """Rebuild on ``base``; a base whose targets differ from the saved ones is refused."""
        config = _read_config(path, "FunctionalMemory")
        fm = cls(base, config["targets"], config["rank"], config["alpha"], config["condition_dim"],
                 GeneratorConfig.from_dict(config["generator"]), config.get("exclude"))
        fm._check_targets(config["resolved_targets"], path)
        fm.generator.load_state_dict(read_safetensors(Path(path) / WEIGHTS_NAME))
        return fm


class SharedLoRA(_Mountable):
    """One static LoRA on the same targets: the baseline every sample shares.

    Factors are stored as PEFT names them: ``lora_A`` (Kaiming-uniform) and ``lora_B`` (zeros),
    in ``nn.ParameterDict``s keyed by target name (dots as ``__``).
    """

    def __init__(self, base: nn.Module, targets: Patterns, rank: int = 8, alpha: float | None = None,
                 exclude: Patterns | None = None):
        super().__init__(base, targets, rank, alpha, exclude)
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for t in self.targets:
            a = torch.empty(t.a_shape(rank))
            for matrix in a.view(-1, *a.shape[-2:]):
                nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))
            self.lora_A[self._key(t.name)] = nn.Parameter(a)
            self.lora_B[self._key(t.name)] = nn.Parameter(torch.zeros(t.b_shape(rank)))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def lora(self) -> LoRA:
        """The shared factors as a batch-1 LoRA (broadcast over any input batch)."""
        return LoRA({t.name: (self.lora_A[self._key(t.name)][None], self.lora_B[self._key(t.name)][None])
                     for t in self.targets}, self.scale)

    def forward(self, *args, **kwargs):
        with self.mounted(self.lora()):
            return self.base(*args, **kwargs)

    def config(self) -> dict:
        return {"funcmem_type": "SharedLoRA", **self._target_config()}

    def save_pretrained(self, path) -> None:
        self._save(path, self.config(), self.lora().state_dict())

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "SharedLoRA":
        config = _read_config(path, "SharedLoRA")
        shared = cls(base, config["targets"], config["rank"], config["alpha"], config.get("exclude"))
        shared._check_targets(config["resolved_targets"], path)
        lora = LoRA.from_state_dict(read_safetensors(Path(path) / WEIGHTS_NAME), config["alpha"] / config["rank"])
        with torch.no_grad():
            for name, (a, b) in lora.factors.items():
                shared.lora_A[cls._key(name)].copy_(a[0])
                shared.lora_B[cls._key(name)].copy_(b[0])
        return shared
