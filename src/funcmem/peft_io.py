"""PEFT LoRA adapters in and out of funcmem.

One instance of a generated LoRA (or a ``SharedLoRA``) leaves funcmem as a PEFT adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained``
and other readers of PEFT LoRAs load; a PEFT LoRA adapter comes in as a ``SharedLoRA``::

    fm.export_peft(lora, i, "adapter/")                 # sample i of fm.generate(condition)
    model = peft.PeftModel.from_pretrained(base, "adapter/")   # == base under fm.mounted(lora[i])
    shared.export_peft("adapter/")
    shared = funcmem.SharedLoRA.from_peft(base, "adapter/")

Factor layouts (PEFT keys ``base_model.model.{module}.lora_A.weight`` / ``.lora_B.weight``):

| target                  | funcmem A, B            | PEFT lora_A.weight, lora_B.weight                 |
| ----------------------- | ----------------------- | ------------------------------------------------- |
| Linear                  | (r, in), (out, r)       | the same                                          |
| Conv2d                  | (r, C*kh*kw), (out, r)  | (r, C, kh, kw) conv, (out, r, 1, 1) conv          |
| experts (E, out, in)    | (E, r, in), (E, out, r) | (E*r, in) expert-major, (out, r*E) expert-minor   |

Stacked expert weights use PEFT's ``target_parameters`` (checked with peft 0.21, which reads a
3-D parameter as (E, out, in) unless its module sets ``is_transposed``); several targeted parameters
of one module nest, the first registered innermost, so its keys read
``{module}.base_layer.lora_A.weight``. PEFT is not needed to write or read
these files; only safetensors weights are read (never pickles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .config_checks import check_peft_values
from .io import read_json, read_safetensors, write_json, write_safetensors
from .lora import LoRA
from .targets import Target, candidates, describe, exact, unwrap

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."

# adapter_config.json fields a funcmem LoRA cannot hold when set (None / False / empty are fine)
UNSUPPORTED = {
    "use_dora": "DoRA (a learned magnitude vector per output)",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "lora_bias": "a trained bias on lora_B",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "modules_to_save": "fully trained copies of modules",
    "layer_replication": "replicated layers",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "velora_config": "VeLoRA", "kasa_config": "KaSA",
    "arrow_config": "Arrow routing", "alora_invocation_tokens": "activated LoRA",
}


def _expert_keys(targets: list[Target]) -> dict[str, str]:
    """PEFT module key of each experts target: parameters of one module nest, first innermost."""
    by_owner: dict[str, list[str]] = {}
    for t in targets:
        if t.kind == "experts":
            by_owner.setdefault(t.owner, []).append(t.name)
    keys = {}
    for owner, names in by_owner.items():
        for j, name in enumerate(names):
            keys[name] = owner + ".base_layer" * (len(names) - 1 - j)
    return keys


def export_peft(mountable, lora: LoRA, index: int, path: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write sample ``index`` of ``lora`` as a PEFT LoRA adapter directory.

    Args:
        mountable: the ``FunctionalMemory`` or ``SharedLoRA`` whose targets ``lora`` is for.
        lora: per-sample factors (``fm.generate(condition)``; an index is honoured).
        index: which sample.
        path: the directory to write (``adapter_config.json``, ``adapter_model.safetensors``).
        base_model_name_or_path: recorded in the config for tools that read it.

    Raises:
        IndexError: ``index`` out of range. KeyError: the LoRA lacks a target's factors.
        NotImplementedError: a target PEFT cannot hold the same way (Conv2d with dilation,
            stacked experts laid out (E, in, out)), named.
    """
    adapter = adapter_weights(mountable, lora, index)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / WEIGHTS_NAME, {PREFIX + k: v for k, v in adapter.state.items()}, metadata={"format": "pt"})
    write_json(path / CONFIG_NAME, _adapter_config(adapter.rank, adapter.alpha, adapter.modules, adapter.parameters,
                                                   base_model_name_or_path))


@dataclass
class AdapterWeights:
    """One sample's LoRA in PEFT's layout: ``state`` maps ``{module}.lora_A.weight`` / ``.lora_B.weight``
    (no prefix) to tensors; ``modules`` / ``parameters`` are PEFT's ``target_modules`` /
    ``target_parameters``; the update is ``alpha / rank * B A``."""

    state: dict[str, Tensor]
    modules: list[str]
    parameters: list[str]
    rank: int
    alpha: float


def adapter_weights(mountable, lora: LoRA, index: int) -> AdapterWeights:
    """Sample ``index`` of ``lora`` (for ``mountable``'s targets) in PEFT's layout (see the module doc).

    Raises: as ``export_peft``.
    """
    n = len(lora)
    if not -n <= index < n:
        raise IndexError(f"sample {index} out of range for a LoRA of {n} samples")
    one = lora[index]
    modules, parameters, state = [], [], {}
    expert_keys = _expert_keys(mountable.targets)
    for t in mountable.targets:
        if t.name not in one.factors:
            raise KeyError(f"the LoRA has no factors for target {t.name!r}")
        a, b = (f[0].detach() for f in one.factors[t.name])
        key, a, b = _to_peft(mountable.base, t, a, b, expert_keys)
        (parameters if t.kind == "experts" else modules).append(t.name)
        state[f"{key}.lora_A.weight"] = a
        state[f"{key}.lora_B.weight"] = b
    rank = mountable.rank
    alpha = mountable.alpha if math.isclose(one.scale, mountable.scale) else one.scale * rank
    return AdapterWeights(state, modules, parameters, rank, alpha)


def adapter_config(adapter: AdapterWeights, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` content for ``adapter`` (what ``export_peft`` writes beside the weights)."""
    return _adapter_config(adapter.rank, adapter.alpha, adapter.modules, adapter.parameters, base_model_name_or_path)


def _to_peft(base: nn.Module, t: Target, a: Tensor, b: Tensor, expert_keys: dict[str, str]) -> tuple[str, Tensor, Tensor]:
    """(PEFT module key, lora_A weight, lora_B weight) of one sample's factors at target ``t``."""
    if t.kind == "linear":
        return t.name, a, b
    if t.kind == "conv2d":
        conv = unwrap(base.get_submodule(t.name))
        if conv.dilation != (1, 1):
            raise NotImplementedError(f"{t.name}: PEFT's LoRA on Conv2d ignores dilation {conv.dilation}; "
                                      "it cannot hold this LoRA")
        return t.name, a.reshape(a.shape[0], conv.in_channels, *conv.kernel_size), b[..., None, None]
    owner = unwrap(base.get_submodule(t.owner))
    if getattr(owner, "is_transposed", False):
        raise NotImplementedError(f"{t.name}: PEFT reads this module's experts as (E, in, out) "
                                  "(is_transposed); funcmem's are (E, out, in)")
    e, r, _ = a.shape
    a = a.reshape(e * r, -1)  # (E*r, in), row e*r + i
    b = b.permute(1, 2, 0).reshape(b.shape[1], r * e)  # (out, r*E), column i*E + e
    return expert_keys[t.name], a, b


def _adapter_config(rank: int, alpha: float, modules: list[str], parameters: list[str],
                    base_model_name_or_path: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "target_modules": modules or None, "target_parameters": parameters or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
        "layers_to_transform": None, "layers_pattern": None,
    }


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter in funcmem's terms: ``targets`` (one exact-name pattern), rank, alpha
    and per-target factors A (r, in) / (E, r, in), B (out, r) / (E, out, r)."""

    targets: str
    rank: int
    alpha: float
    factors: dict[str, tuple[Tensor, Tensor]]


def _matches_parameter(key: str, patterns: list[str]) -> bool:
    return any(key == p or key.endswith("." + p) for p in patterns)


def read_peft(path: str | Path, base: nn.Module) -> PeftAdapter:
    """Read a PEFT LoRA adapter directory for ``base``.

    Raises:
        FileNotFoundError: no adapter_config.json, or weights only as a pickle (refused).
        NotImplementedError: a setting funcmem cannot represent (DoRA, rank patterns, ...), named.
        ValueError: a weight the base has no place for, or of the wrong shape (both shapes named).
    """
    path = Path(path)
    config = _read_adapter_config(path)
    weights = path / WEIGHTS_NAME
    rank = config["r"]
    scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    names = candidates(base)
    params = list(config.get("target_parameters") or [])
    factors = {}
    for module, pair in _factor_pairs(weights).items():
        t = _target_of(module, names, params, weights)
        a, b = _from_peft(t, pair["A"], pair["B"], names[t.name][0])
        for got, want, which in ((a, t.a_shape(rank), "lora_A"), (b, t.b_shape(rank), "lora_B")):
            if tuple(got.shape) != want:
                raise ValueError(f"{weights}: {module}.{which} has shape {tuple(pair[which[-1]].shape)}; the base's "
                                 f"{t.kind} {t.name} with r={rank} needs {want} in funcmem's layout")
        factors[t.name] = (a.contiguous(), b.contiguous())
    if not factors:
        raise ValueError(f"{weights} holds no LoRA weights")
    return PeftAdapter(exact(list(factors)), rank, scale * rank, factors)


def _read_adapter_config(path: Path) -> dict:
    """adapter_config.json, checked to describe a plain LoRA funcmem can hold, with safetensors weights."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a PEFT adapter directory")
    config = read_json(file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type is {config.get('peft_type')!r}; only LORA adapters load")
    check_peft_values(config, file)  # r an integer, lora_alpha finite, use_rslora a boolean
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise NotImplementedError(f"{file} sets {field}={config[field]!r} ({what}), which a funcmem LoRA "
                                      "cannot represent")
    if config.get("bias", "none") != "none":
        raise NotImplementedError(f"{file} sets bias={config['bias']!r} (trained base biases); only 'none' loads")
    if not (path / WEIGHTS_NAME).is_file():
        pickled = " (adapter_model.bin is a pickle, which funcmem never loads)" if (path / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}{pickled}")
    return config


def _factor_pairs(weights: Path) -> dict[str, dict[str, Tensor]]:
    """PEFT module key -> {"A": lora_A weight, "B": lora_B weight}; anything else is refused."""
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in read_safetensors(weights).items():
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise NotImplementedError(f"{weights}: weight {key!r} is not a LoRA factor (lora_A / lora_B) funcmem "
                                      "can hold")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{weights}: {key} holds NaN or Inf values")
        module, which = key[len(PREFIX): -len(".lora_A.weight")], key[-len("A.weight")]
        pairs.setdefault(module, {})[which] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"{weights}: {module} has lora_{next(iter(pair))} without its partner")
    return pairs


def _target_of(module: str, names: dict, params: list[str], weights: Path) -> Target:
    """The funcmem target a PEFT module key stands for (PEFT's target_parameters nest wrappers,
    ``{module}.base_layer...``, the first registered parameter innermost)."""
    name, depth = module, 0
    while name.endswith(".base_layer"):
        name, depth = name[: -len(".base_layer")], depth + 1
    if name not in names:
        raise ValueError(f"{weights} holds LoRA for {name!r}, which the base lacks")
    owner = names[name][0]
    targeted = [p for p, v in owner.named_parameters(recurse=False) if _matches_parameter(f"{name}.{p}", params)]
    if targeted and getattr(owner, "is_transposed", False):
        raise NotImplementedError(f"{name}: PEFT reads this module's experts as (E, in, out) (is_transposed); "
                                  "funcmem's are (E, out, in)")
    if targeted:
        if depth >= len(targeted):
            raise ValueError(f"{weights}: {module} nests deeper than the {len(targeted)} targeted parameters")
        name = f"{name}.{targeted[len(targeted) - 1 - depth]}"
        if name not in names:
            raise NotImplementedError(f"{weights} holds LoRA for parameter {name!r}, which is not a stacked "
                                      "(E, out, in) expert weight: funcmem cannot hold it")
    found = describe(name, *names[name])
    if isinstance(found, str) or len(found) != 1:
        why = found if isinstance(found, str) else "a module holding several stacked expert weights"
        raise NotImplementedError(f"{weights} holds LoRA for {name!r}, {why}: funcmem cannot hold it")
    return found[0]


def _from_peft(t: Target, a: Tensor, b: Tensor, module: nn.Module) -> tuple[Tensor, Tensor]:
    """PEFT's lora_A / lora_B weights of target ``t`` in funcmem's layout (see the module doc)."""
    if t.kind == "conv2d":
        if module.dilation != (1, 1):
            raise NotImplementedError(f"{t.name}: funcmem's Conv2d LoRA uses the base's dilation {module.dilation}, "
                                      "PEFT's does not")
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if t.kind == "experts":
        e = t.num_experts
        return a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, r, in), (E, out, r)
    return a, b
