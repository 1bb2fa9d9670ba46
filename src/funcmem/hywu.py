"""HY-WU parameter-generator checkpoints (``shared/hywu-format.md``): load, mount, convert.

A checkpoint is a directory with ``config.json`` (``model_type: "parameter_generator"``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Its weights load into
funcmem's :class:`~funcmem.generator.ParameterGenerator` unchanged; no code of the authors is used.

    gen = funcmem.hywu.load_generator("path/to/checkpoint")
    out = gen(condition)   # {"{prefix}{layer}.{module}.lora_A": (B, ...), ..., "scale": tensor}

    fm = funcmem.hywu.from_pretrained("path/to/checkpoint", base)   # a FunctionalMemory on base
    with fm.mounted(fm.generate(condition)):                         # LoRA on {prefix}{layer}.{module}
        y = base(x)

    funcmem.hywu.convert_to_funcmem("hywu_dir", "funcmem_dir")   # and convert_to_hywu: lossless
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from .config_checks import check_hywu_values, integer
from .generator import FORMAT_DESIGN, GeneratorConfig, ParameterGenerator
from .io import (atomic_directory, load_safetensors_dir, read_json, read_safetensors, safetensors_dir_shapes,
                 write_json, write_safetensors)
from .lora import LoRA
from .memory import FunctionalMemory, read_config as read_funcmem_config
from .targets import Target, candidates, describe, exact, group_layers
from .tokens import Entry, TokenLayout
from .version import __version__

REQUIRED = ("token_dim", "rank", "alpha", "input_dim", "d_model", "head_dim", "dim_accumulation",
            "num_base_model_layers", "num_pg_layers", "prefix", "pg_mapping")
WEIGHTS_NAME = "model.safetensors"
# what the format fixes and funcmem's GeneratorConfig leaves free (its initialisation is no part of a checkpoint)
FIXED_GENERATOR = {k: v for k, v in FORMAT_DESIGN.items() if k != "factor_init"}


# ---------------------------------------------------------------- config


def validate_config(config: dict) -> None:
    """Raise ``ValueError`` naming the first field that is missing or malformed (sizes are
    integers within bounds, alpha finite: ``config_checks.check_hywu_values``)."""
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"HY-WU config.json lacks fields {missing}")
    check_hywu_values(config, "HY-WU config.json")
    if config.get("output_dim", config["token_dim"]) != config["token_dim"]:
        raise ValueError(f"output_dim ({config['output_dim']}) must equal token_dim ({config['token_dim']})")
    if not isinstance(config["pg_mapping"], dict) or not config["pg_mapping"]:
        raise ValueError("HY-WU config.json: pg_mapping must be a non-empty object of module path -> dims")
    expand_mapping(config["pg_mapping"])


def _dims(where: str, dims) -> tuple[int, int]:
    for key in ("lora_A_dim", "lora_B_dim"):
        if not isinstance(dims, dict) or key not in dims:
            raise ValueError(f"HY-WU config.json: pg_mapping[{where!r}] lacks {key!r}")
        integer(dims[key], f"pg_mapping[{where!r}].{key}", "HY-WU config.json")
    return dims["lora_A_dim"], dims["lora_B_dim"]


def expand_mapping(pg_mapping: dict) -> list[tuple[str, int, int, int | None]]:
    """pg_mapping -> [(module, lora_A_dim, lora_B_dim, num_experts or None)], grouped entries
    expanded in place (module ``path.name``, in their sub_weights order)."""
    modules = []
    for path, spec in pg_mapping.items():
        if isinstance(spec, dict) and spec.get("type") == "grouped":
            for key in ("num_experts", "sub_weights"):
                if key not in spec:
                    raise ValueError(f"HY-WU config.json: grouped pg_mapping[{path!r}] lacks {key!r}")
            experts = integer(spec["num_experts"], f"pg_mapping[{path!r}].num_experts", "HY-WU config.json")
            if not isinstance(spec["sub_weights"], dict) or not spec["sub_weights"]:
                raise ValueError(f"HY-WU config.json: pg_mapping[{path!r}].sub_weights must be a non-empty object")
            for sub, dims in spec["sub_weights"].items():
                modules.append((f"{path}.{sub}", *_dims(f"{path}.{sub}", dims), experts))
        else:
            modules.append((path, *_dims(path, spec), None))
    return modules


def grid_from_config(config: dict) -> dict:
    """The token grid a config describes: layers ``{prefix}{n}``, slots in pg_mapping order."""
    return {"layers": [f"{config['prefix']}{n}" for n in range(config["num_base_model_layers"])],
            "slots": [m[0] for m in expand_mapping(config["pg_mapping"])]}


def layout_from_config(config: dict) -> TokenLayout:
    """The token layout a HY-WU config describes: every layer has every pg_mapping module."""
    r, n_layers = config["rank"], config["num_base_model_layers"]
    modules = expand_mapping(config["pg_mapping"])
    entries = []
    for layer in range(n_layers):
        for slot, (name, a_dim, b_dim, experts) in enumerate(modules):
            lead = () if experts is None else (experts,)
            entries.append(Entry(f"{config['prefix']}{layer}.{name}", layer, slot, (*lead, r, a_dim), (*lead, b_dim, r)))
    return TokenLayout(r, config["token_dim"], n_layers, [m[0] for m in modules], entries)


def generator_config(config: dict) -> GeneratorConfig:
    """funcmem's generator for a HY-WU config: its size, and the format's design (``FORMAT_DESIGN``)
    whatever funcmem's defaults for new generators are."""
    return GeneratorConfig(d_model=config["d_model"], depth=config["num_pg_layers"], head_dim=config["head_dim"],
                           token_dim=config["token_dim"], dim_accumulation=config["dim_accumulation"],
                           **FORMAT_DESIGN)


def read_config(path: str | Path) -> dict:
    """config.json with pg_mapping's key order as written (it sets the module order)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a HY-WU checkpoint directory: no config.json")
    config = read_json(file, object_pairs_hook=OrderedDict)
    if config.get("model_type") not in (None, "parameter_generator"):
        raise ValueError(f"{file}: model_type is {config.get('model_type')!r}, expected 'parameter_generator'")
    validate_config(config)
    return config


# ---------------------------------------------------------------- weights


def check_weights(generator: nn.Module, state: dict[str, Tensor | tuple]) -> None:
    """Raise ``ValueError`` naming every missing, unexpected or misshapen weight (both shapes).

    ``state`` holds the checkpoint's tensors or only their shapes (``io.safetensors_dir_shapes``).
    """
    own = generator.state_dict()
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in state.items()}
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    wrong = [f"{k}: checkpoint {shapes[k]} vs config {tuple(v.shape)}"
             for k, v in own.items() if k in shapes and shapes[k] != tuple(v.shape)]
    if missing or unexpected or wrong:
        raise ValueError("HY-WU weights do not fit their config.json:"
                         + (f"\n  missing: {missing[:8]}" if missing else "")
                         + (f"\n  unexpected: {unexpected[:8]}" if unexpected else "")
                         + ("\n  " + "\n  ".join(wrong[:8]) if wrong else ""))


def _shape_check(config: dict, state: dict[str, Tensor | tuple]) -> None:
    """check_weights against a generator built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        check_weights(HywuGenerator(config).generator, state)


class HywuGenerator(nn.Module):
    """A HY-WU checkpoint's generator: condition -> dict of LoRA factors and ``scale``.

    Shape:
        condition: (B, L, input_dim) or (B, 1, L, input_dim).
        output: ``{prefix}{layer}.{module}.lora_A`` (B, [E,] r, A_dim), ``.lora_B`` (B, [E,] B_dim, r),
        ``scale`` (1,).
    """

    def __init__(self, config: dict):
        super().__init__()
        validate_config(config)
        self.config = dict(config)
        self.layout = layout_from_config(config)
        self.generator = ParameterGenerator(generator_config(config), config["input_dim"],
                                            config["num_base_model_layers"], self.layout.tokens_per_layer,
                                            self.layout.h_a, config["rank"])
        self.scale = config["alpha"] / config["rank"]

    def generate(self, condition: Tensor) -> LoRA:
        return self.layout.detokenize(self.generator(condition), self.scale)

    def forward(self, condition: Tensor) -> dict[str, Tensor]:
        out = self.generate(condition).state_dict()
        out["scale"] = torch.tensor([self.scale], dtype=torch.float32)
        return out

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load format-named weights; a mismatch names the offending weights and shapes."""
        check_weights(self.generator, state)
        self.generator.load_state_dict(state)


def load_generator(path: str | Path, dtype: torch.dtype = torch.float32) -> HywuGenerator:
    """Load a HY-WU checkpoint directory (single file or sharded safetensors).

    The weights' shapes are checked against the config from the safetensors header, on a
    generator built on the meta device, before anything is allocated.
    """
    config = read_config(path)
    _shape_check(config, safetensors_dir_shapes(path))
    gen = HywuGenerator(config)
    gen.load_weights(load_safetensors_dir(path))
    return gen.to(dtype).eval()


# ---------------------------------------------------------------- mounting on a base


def check_base(config: dict, base: nn.Module) -> None:
    """Every ``{prefix}{layer}.{module}`` must exist in ``base`` with the checkpoint's dims.

    A non-grouped module is an ``nn.Linear`` (in = lora_A_dim, out = lora_B_dim) or an
    ``nn.Conv2d`` (in_channels * kh * kw = lora_A_dim); a grouped one is a 3-D parameter
    (num_experts, lora_B_dim, lora_A_dim) of the module at its path.

    Raises:
        ValueError: naming the missing path (and what exists under that layer) or both shapes.
    """
    names = candidates(base)
    prefix = config["prefix"]
    for n in range(config["num_base_model_layers"]):
        for module, a_dim, b_dim, experts in expand_mapping(config["pg_mapping"]):
            name = f"{prefix}{n}.{module}"
            if name not in names:
                near = [k for k in names if k.startswith(f"{prefix}{n}.")] or list(names)
                raise ValueError(f"the HY-WU checkpoint puts LoRA on {name!r} ({prefix!r} + layer + pg_mapping path), "
                                 f"which the base lacks. The base has: {', '.join(near[:20])}")
            found = describe(name, *names[name])
            if isinstance(found, str):
                raise ValueError(f"the HY-WU checkpoint puts LoRA on {name!r}, a {found}")
            if len(found) != 1:
                raise ValueError(f"the HY-WU checkpoint puts LoRA on {name!r}, which holds several stacked expert "
                                 f"weights {[t.name for t in found]}: the checkpoint must name one (a grouped entry)")
            t = found[0]
            if (t.num_experts, t.in_features, t.out_features) != (experts, a_dim, b_dim):
                want = (f"(E={experts}, out={b_dim}, in={a_dim}) (num_experts, lora_B_dim, lora_A_dim)" if experts
                        else f"(in={a_dim}, out={b_dim}) (lora_A_dim, lora_B_dim)")
                have = (f"(E={t.num_experts}, out={t.out_features}, in={t.in_features})" if t.num_experts
                        else f"(in={t.in_features}, out={t.out_features})")
                kind = {"linear": "Linear", "conv2d": "Conv2d (in = in_channels*kh*kw)",
                        "experts": "stacked expert weight"}[t.kind]
                raise ValueError(f"{name}: the HY-WU checkpoint's LoRA is for {want} but the base's {kind} is {have}")


def from_pretrained(path: str | Path, base: nn.Module, dtype: torch.dtype = torch.float32):
    """A :class:`~funcmem.memory.FunctionalMemory` on ``base`` running a HY-WU checkpoint.

    Its targets are ``{prefix}{layer}.{module}`` for every layer and ``pg_mapping`` module (grouped
    entries: per-expert LoRA on the stacked expert weights), in the checkpoint's token order, so
    ``fm.generate(c)`` equals ``load_generator(path)(c)`` and ``fm.mounted`` applies it per sample.
    ``base`` is frozen and wrapped in place, as ``FunctionalMemory`` does. ``fm.guard`` (funcmem's
    bound on each update, 10x its weight's norm) stays on; set it to None for the raw factors.

    Raises:
        ValueError: a path the base lacks, dims that differ from the base's, weights that do not
            fit config.json.
    """
    config = read_config(path)
    check_base(config, base)
    _shape_check(config, safetensors_dir_shapes(path))
    state = load_safetensors_dir(path)
    grid = grid_from_config(config)
    names = [f"{layer}.{slot}" for layer in grid["layers"] for slot in grid["slots"]]
    fm = FunctionalMemory(base, exact(names), config["rank"], config["alpha"], config["input_dim"],
                          generator_config(config), grid=grid, advise=False)  # the checkpoint's shape is decided
    fm.generator.load_state_dict(state)
    fm.generator.to(dtype)
    return fm


# ---------------------------------------------------------------- conversion


def funcmem_config(config: dict) -> dict:
    """The funcmem ``config.json`` of a HY-WU config (what ``FunctionalMemory.from_pretrained`` reads).

    Non-grouped modules are recorded as ``linear`` targets (the format cannot say Conv2d); the
    HY-WU config itself is kept under ``hywu_config`` so that converting back is exact.
    """
    grid = grid_from_config(config)
    modules = {m[0]: m[1:] for m in expand_mapping(config["pg_mapping"])}
    resolved = {}
    for layer in grid["layers"]:
        for slot in grid["slots"]:
            a_dim, b_dim, experts = modules[slot]
            resolved[f"{layer}.{slot}"] = ["experts" if experts else "linear", a_dim, b_dim, experts]
    return {"funcmem_type": "FunctionalMemory", "funcmem_version": __version__, "targets": exact(list(resolved)),
            "exclude": None, "rank": config["rank"], "alpha": float(config["alpha"]), "resolved_targets": resolved,
            "condition_dim": config["input_dim"], "generator": generator_config(config).to_dict(), "grid": grid,
            "hywu_config": config}


def _pg_mapping(by_name: dict[str, Target], layers: list[str], slots: list[str]) -> OrderedDict:
    """HY-WU's ``pg_mapping`` of a funcmem target grid: slot -> dims, stacked experts grouped by module.

    Raises ``ValueError`` where the format cannot hold the grid (a slot missing from a layer or
    shaped differently across layers, a Conv2d, expert weights that cannot form a grouped entry).
    """
    pg_mapping: OrderedDict = OrderedDict()
    for slot in slots:
        sigs = {layer: by_name.get(f"{layer}.{slot}") for layer in layers}
        lacking = [layer for layer, t in sigs.items() if t is None]
        if lacking:
            raise ValueError(f"HY-WU gives every layer the same modules; layers {lacking[:6]} lack {slot!r}")
        shapes = {tuple(t.signature()) for t in sigs.values()}
        if len(shapes) > 1:
            raise ValueError(f"HY-WU gives a module the same shape in every layer; {slot!r} has {sorted(shapes)}")
        t = sigs[layers[0]]
        dims = {"lora_A_dim": t.in_features, "lora_B_dim": t.out_features}
        if t.kind == "conv2d":
            raise ValueError(f"the HY-WU format has no Conv2d targets ({t.name})")
        if t.kind != "experts":
            pg_mapping[slot] = dims
            continue
        owner, _, sub = slot.rpartition(".")
        group = pg_mapping.get(owner)
        if not owner or (group is not None and (list(pg_mapping)[-1] != owner or group.get("type") != "grouped"
                                                or group["num_experts"] != t.num_experts)):
            raise ValueError(f"expert weights {slot!r} cannot form a HY-WU grouped entry (a grouped module's "
                             "weights must be adjacent, with one number of experts, under a module path)")
        if group is None:
            group = pg_mapping[owner] = OrderedDict(type="grouped", num_experts=t.num_experts,
                                                    sub_weights=OrderedDict())
        group["sub_weights"][sub] = dims
    return pg_mapping


def hywu_config(config: dict) -> OrderedDict:
    """The HY-WU ``config.json`` of a funcmem FunctionalMemory config.

    Needs layers named ``{prefix}0 .. {prefix}N-1``, every layer with every slot at the same
    shape, no Conv2d targets, and a generator of the format's fixed kind (mlp_ratio 4, rope theta
    10000, factorized attention, the two shared output heads, no basis, no modulation:
    ``FIXED_GENERATOR``); anything else is a ``ValueError`` naming it and why. A ``hywu_config``
    kept by ``convert_to_funcmem`` is returned as written, after checking it agrees.
    """
    gen = GeneratorConfig.from_dict(config["generator"])
    for field, value in FIXED_GENERATOR.items():
        if getattr(gen, field) != value:
            raise ValueError(f"the HY-WU format fixes generator.{field} = {value!r}; this generator has "
                             f"{getattr(gen, field)!r}, which the format's weights cannot hold")
    targets = [Target(name, *sig) for name, sig in config["resolved_targets"].items()]
    by_name = {t.name: t for t in targets}
    if config.get("grid"):
        layers, slots = config["grid"]["layers"], config["grid"]["slots"]
    else:
        layers, slots = group_layers(targets)
    prefix = re.sub(r"\d+$", "", layers[0])
    if layers != [f"{prefix}{n}" for n in range(len(layers))]:
        raise ValueError(f"HY-WU layers are '{{prefix}}0 .. {{prefix}}N-1'; these targets' layers are {layers[:6]}")
    pg_mapping = _pg_mapping(by_name, layers, slots)
    alpha = config["alpha"]
    derived = OrderedDict(
        model_type="parameter_generator", token_dim=gen.token_dim, rank=config["rank"],
        alpha=int(alpha) if float(alpha).is_integer() else alpha, input_dim=config["condition_dim"],
        d_model=gen.d_model, head_dim=gen.head_dim, dim_accumulation=gen.dim_accumulation,
        num_base_model_layers=len(layers), output_dim=gen.token_dim, num_pg_layers=gen.depth, prefix=prefix,
        pg_mapping=pg_mapping)
    kept = config.get("hywu_config")
    if kept is None:
        return derived
    canon = lambda k, v: float(v) if k == "alpha" else json.dumps(v)  # noqa: E731 (pg_mapping order counts)
    differ = [k for k in derived if k in kept and canon(k, kept[k]) != canon(k, derived[k])]
    if differ:
        raise ValueError(f"the kept hywu_config disagrees with the funcmem config on {differ}")
    return OrderedDict(kept)


def convert_to_funcmem(src: str | Path, dst: str | Path) -> None:
    """Write a funcmem generator directory (``FunctionalMemory.from_pretrained``) from a HY-WU one.

    The weights are copied bit for bit (same names, same dtype; shards become one file), after
    checking they fit the config. ``dst`` must not exist or be empty; it is written in a temporary
    sibling and renamed into place (``io.atomic_directory``), so a killed convert leaves no ``dst``.
    """
    config = read_config(src)
    state = load_safetensors_dir(src)
    _shape_check(config, state)
    with atomic_directory(dst) as tmp:  # a killed convert leaves no half-written dst
        write_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt", "funcmem_version": __version__})
        write_json(tmp / "config.json", funcmem_config(config))


def convert_to_hywu(src: str | Path, dst: str | Path) -> None:
    """Write a HY-WU checkpoint directory from a funcmem ``FunctionalMemory`` one (see ``hywu_config``).

    The weights are copied bit for bit. ``dst`` must not exist or be empty (written as
    ``convert_to_funcmem`` writes it).
    """
    config = hywu_config(read_funcmem_config(src, "FunctionalMemory"))
    state = read_safetensors(Path(src) / WEIGHTS_NAME)
    _shape_check(config, state)
    with atomic_directory(dst) as tmp:
        write_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
