"""``FunctionalMemory``: a generator of per-instance LoRA mounted on a frozen base, and what it
shares with the static LoRAs of ``funcmem.bank`` (``Mountable``: wrapped targets, mounting,
merging, saving).

    condition (B, L, condition_dim) --generator--> tokens (B, N, H, r, T) --detokenize--> LoRA
    LoRA --mounted--> base(x) with scale * B_i (A_i x) added at every target, per sample i
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from . import mount
from .diffusers_io import export_diffusers
from .config_checks import check_fits, check_funcmem_config
from .generator import GeneratorConfig, ParameterGenerator, check_head
from .guard import LoRAGuard, check_condition, check_mask
from .io import read_json, read_safetensors, write_json, write_safetensors
from .lora import LoRA
from .peft_io import export_peft
from .targets import Patterns, Target, resolve_targets
from .tokens import TokenLayout, grid_layout
from .version import __version__

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


class Mountable(nn.Module):
    """What both objects share: a frozen base with wrapped targets, mounting, merging."""

    def __init__(self, base: nn.Module, targets: Patterns, rank: int, alpha: float | None, exclude: Patterns | None):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be an nn.Module, got {type(base).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
        if alpha is not None and not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha!r}")
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
        return {"funcmem_version": __version__, "targets": self.target_patterns, "exclude": self.exclude,
                "rank": self.rank, "alpha": self.alpha,
                "resolved_targets": {t.name: t.signature() for t in self.targets}}

    def _save(self, path, config: dict, weights: dict[str, Tensor]) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / WEIGHTS_NAME, weights, metadata={"format": "pt", "funcmem_version": __version__})
        write_json(path / CONFIG_NAME, config)


def check_targets(base: nn.Module, config: dict, path) -> None:
    """A saved config must describe ``base``'s targets (resolved from its patterns), shape for shape."""
    mine = {t.name: t.signature() for t in resolve_targets(base, config["targets"], config.get("exclude"))}
    saved = config["resolved_targets"]
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


REQUIRED_FIELDS = {"FunctionalMemory": ("targets", "rank", "alpha", "condition_dim", "generator", "resolved_targets"),
                   "SharedLoRA": ("targets", "rank", "alpha", "resolved_targets"),
                   "LoRABank": ("targets", "rank", "alpha", "num", "resolved_targets")}


def read_config(path, kind: str) -> dict:
    """A funcmem directory's ``config.json``, checked to hold a ``kind`` with every field it needs."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a funcmem directory")
    config = read_json(file)
    found = config.get("funcmem_type")
    if found != kind:
        what = f"a {found!r}" if found else "no funcmem_type (it is not a funcmem directory)"
        raise ValueError(f"{path} holds {what}, not a {kind!r}")
    missing = [k for k in REQUIRED_FIELDS[kind] if k not in config]
    if missing:
        raise ValueError(f"{file} lacks fields {missing}; a {kind} config needs {list(REQUIRED_FIELDS[kind])}")
    check_funcmem_config(config, kind, file)  # integer sizes within bounds, finite alpha
    return config


def load_weights(module: nn.Module, path) -> None:
    """Load ``model.safetensors`` into ``module``; a mismatch (read from the file's header first)
    names the file and the weights."""
    file = Path(path) / WEIGHTS_NAME
    check_fits({k: tuple(v.shape) for k, v in module.state_dict().items()}, file, CONFIG_NAME)
    module.load_state_dict(read_safetensors(file))


def generator_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The generator weights' shapes a FunctionalMemory config describes (built on the meta device:
    no memory, so a config asking for terabytes costs nothing before ``check_fits`` refuses it)."""
    targets = [Target(name, *sig) for name, sig in config["resolved_targets"].items()]
    gen, rank, grid = GeneratorConfig.from_dict(config["generator"]), config["rank"], config.get("grid")
    with torch.device("meta"):
        layout = (TokenLayout.from_targets(targets, rank, gen.token_dim) if grid is None
                  else grid_layout(targets, grid, rank, gen.token_dim))
        model = ParameterGenerator(gen, config["condition_dim"], layout.num_layers, layout.tokens_per_layer,
                                   layout.h_a, rank)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def factor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """A LoRABank / SharedLoRA config's factor shapes: ``{target}.lora_A`` (K, *A), ``.lora_B`` (K, *B)."""
    num, rank = config.get("num", 1), config["rank"]
    shapes = {}
    for name, sig in config["resolved_targets"].items():
        t = Target(name, *sig)
        shapes[f"{name}.lora_A"], shapes[f"{name}.lora_B"] = (num, *t.a_shape(rank)), (num, *t.b_shape(rank))
    return shapes


class FunctionalMemory(Mountable):
    """A trained generator of per-instance LoRA for a frozen base.

    Args:
        base: any ``nn.Module``; this call freezes it and wraps its targets.
        targets: glob patterns / name suffixes over ``named_modules()`` names, or one regex.
        rank, alpha: LoRA rank and alpha (scale = alpha / rank).
        condition_dim: width of the condition vectors.
        generator: generator size.
        exclude: patterns of modules to leave out.
        grid: optional explicit token grid ``{"layers": [layer paths], "slots": [slot names]}``:
            layer n slot k is the target ``f"{layers[n]}.{slots[k]}"``, and the targets must be
            exactly these. It fixes the token order where the default (layers and slots in
            ``named_modules()`` order, split at the last number) would differ, as for HY-WU
            checkpoints, whose module order is their ``pg_mapping``'s (``funcmem.hywu``).
        advise: warn about a generator design that limits what it can generate
            (``HeadBottleneckWarning``); False where the shape is decided: a loaded generator, or a
            design chosen knowingly.

    Shape:
        condition: (B, L, condition_dim) or (B, condition_dim).
    """

    def __init__(self, base: nn.Module, targets: Patterns, rank: int = 8, alpha: float | None = None,
                 condition_dim: int = 384, generator: GeneratorConfig | None = None, exclude: Patterns | None = None,
                 grid: dict | None = None, advise: bool = True):
        super().__init__(base, targets, rank, alpha, exclude)
        self.condition_dim = condition_dim
        self.generator_config = generator or GeneratorConfig()
        self.grid = None if grid is None else {"layers": list(grid["layers"]), "slots": list(grid["slots"])}
        self.layout = (TokenLayout.from_targets(self.targets, rank, self.generator_config.token_dim) if grid is None
                       else grid_layout(self.targets, self.grid, rank, self.generator_config.token_dim))
        gcfg = self.generator_config
        if advise:
            check_head(gcfg)
        groups = None if gcfg.head == "shared" else self.layout.token_groups()
        self.generator = ParameterGenerator(gcfg, condition_dim, self.layout.num_layers,
                                            self.layout.tokens_per_layer, self.layout.h_a, rank, groups)
        if gcfg.factor_init == "lora":
            self.generator.init_factor_scale(self._a_fan_in())
        self.guard: LoRAGuard | None = LoRAGuard()  # bounds each update, refuses NaN/Inf; None: off
        self._norm_cache: dict[str, tuple[tuple, float]] = {}
        self._shuffle = False

    def _a_fan_in(self) -> dict[int, float]:
        """Fan-in of the A factors each head group writes (``ParameterGenerator.init_factor_scale``):
        per slot the mean over layers; for the shared head one effective fan-in f with
        1/f = the element-weighted mean of 1/fan-in over all A factors."""
        by_slot: dict[int, list[tuple[int, int]]] = {}
        for e in self.layout.entries:
            by_slot.setdefault(e.slot, []).append((e.a_shape[-1], math.prod(e.a_shape)))
        if self.generator_config.head == "shared":
            pairs = [p for ps in by_slot.values() for p in ps]
            return {0: sum(n for _, n in pairs) / sum(n / f for f, n in pairs)}
        return {slot: sum(f for f, _ in ps) / len(ps) for slot, ps in by_slot.items()}

    def generate(self, condition: Tensor, mask: Tensor | None = None) -> LoRA:
        """condition (B, L, condition_dim) -> per-sample LoRA (batch B), checked by ``self.guard``.

        Args:
            condition: (B, L, condition_dim) or (B, condition_dim).
            mask: optional (B, L) bool, True for real condition tokens: padding is not attended to,
                so a padded condition gives the LoRA of the unpadded one.

        Raises:
            TypeError / ValueError: a condition of the wrong type, rank, width, device, or with
                NaN/Inf (``guard.check_condition``); a mask of another shape, or with a sample
                that has no real token.
            NonFiniteLoRAError: the generated factors hold NaN or Inf.
        """
        condition = check_condition(condition, self.condition_dim, next(self.generator.parameters()))
        if mask is not None:
            mask = check_mask(mask, condition)
        if self._shuffle and condition.shape[0] > 1:  # each sample gets its neighbour's condition
            condition = condition.roll(1, 0)
            mask = None if mask is None else mask.roll(1, 0)
        lora = self.layout.detokenize(self._tokens(condition, mask), self.scale)
        return lora if self.guard is None else self.guard(lora, self._weight_norms())

    def _tokens(self, condition: Tensor, mask: Tensor | None) -> Tensor:
        """The generator's tokens (B, N, H, r, T), run once per distinct (condition, mask) of the
        batch (a batch of task labels repeats a few conditions) and gathered back to B rows.

        Values and gradients of everything upstream that computed the repeated rows alike are
        those of running every row; the gradient with respect to the condition tensor itself
        lands on the first occurrence of each distinct row (summed over its repeats)."""
        b = condition.shape[0]
        if b < 2:
            return self.generator(condition, mask)
        key = condition.detach().flatten(1)
        if mask is not None:
            key = torch.cat([key, mask.to(key.dtype)], 1)
        distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
        if distinct.shape[0] == b:
            return self.generator(condition, mask)
        first = torch.full((distinct.shape[0],), b, device=inverse.device).scatter_reduce(
            0, inverse, torch.arange(b, device=inverse.device), "amin")  # first sample of each distinct row
        tokens = self.generator(condition[first], None if mask is None else mask[first])
        return tokens[inverse]

    @contextmanager
    def shuffled_conditions(self):
        """Inside the block ``generate`` gives every sample the condition of another sample of the
        batch (its neighbour: a permutation without fixed points). The loss inside minus the
        loss outside is the routing margin (``Trainer`` logs it): near zero, the generator ignores
        its condition."""
        previous, self._shuffle = self._shuffle, True
        try:
            yield
        finally:
            self._shuffle = previous

    def _weight_norms(self) -> dict[str, float]:
        """||W||_F of every target weight, recomputed only when the weight changed (``_version``)."""
        norms = {}
        for name, (wrapper, weight) in self._handles.items():
            w = wrapper.base_layer.get_parameter(weight)
            key = (w.data_ptr(), w._version, w.device)
            cached = self._norm_cache.get(name)
            if cached is None or cached[0] != key:
                cached = self._norm_cache[name] = (key, float(w.detach().float().norm()))
            norms[name] = cached[1]
        return norms

    def forward(self, condition: Tensor, *args, condition_mask: Tensor | None = None, **kwargs):
        """Generate, mount and call the base: ``base(*args, **kwargs)`` with per-sample LoRA
        (``condition_mask``: ``generate``'s mask)."""
        with self.mounted(self.generate(condition, condition_mask)):
            return self.base(*args, **kwargs)

    def config(self) -> dict:
        config = {"funcmem_type": "FunctionalMemory", **self._target_config(), "condition_dim": self.condition_dim,
                  "generator": self.generator_config.to_dict()}
        if self.grid is not None:
            config["grid"] = self.grid
        return config

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (the generator's weights) to a directory."""
        self._save(path, self.config(), self.generator.state_dict())

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "FunctionalMemory":
        """Rebuild on ``base``; a base whose targets differ from the saved ones is refused."""
        config = read_config(path, "FunctionalMemory")
        check_targets(base, config, path)
        check_fits(generator_shapes(config), Path(path) / WEIGHTS_NAME, CONFIG_NAME)  # before allocating
        fm = cls(base, config["targets"], config["rank"], config["alpha"], config["condition_dim"],
                 GeneratorConfig.from_dict(config["generator"]), config.get("exclude"), config.get("grid"),
                 advise=False)  # a saved generator's shape is decided: no advice on it
        load_weights(fm.generator, path)
        return fm

    def export_peft(self, lora: LoRA, index: int, path, base_model_name_or_path: str | None = None) -> None:
        """Write sample ``index`` of ``lora`` as a PEFT adapter directory (``funcmem.peft_io.export_peft``)."""
        export_peft(self, lora, index, path, base_model_name_or_path)

    def export_diffusers(self, lora: LoRA, index: int, path, prefix: str = "transformer") -> None:
        """Write sample ``index`` of ``lora`` as ``pytorch_lora_weights.safetensors`` for diffusers'
        ``load_lora_weights`` / ``load_lora_adapter`` (``funcmem.diffusers_io.export_diffusers``)."""
        export_diffusers(self, lora, index, path, prefix)
