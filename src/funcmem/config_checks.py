"""Checking what a saved directory's ``config.json`` says before anything is built from it.

A loader trusts no number it reads. Sizes are integers (a rank of 4.9 is refused, not
truncated; ``true`` is not 1) between 1 and a bound far above any real model; alpha is a finite
number; booleans are JSON booleans (``"false"`` is refused, not read as true). The weights a
config describes are then compared with the safetensors header (names and shapes, read without
loading a tensor; ``check_fits``), so a config asking for 2.7 TB fails before a byte is allocated
and the memory a load takes is bounded by the file's size.

    check_funcmem_config(config, "FunctionalMemory", file)   # memory.read_config
    check_hywu_values(config, file)                          # hywu.read_config
    check_peft_values(config, file)                          # peft_io.read_peft
    check_fits(expected_shapes, "model.safetensors")         # before allocating the model
"""

from __future__ import annotations

import math
from pathlib import Path

from .io import safetensors_shapes

MAX_SIZE = 1 << 20  # a width, rank or count above a million is a damaged or hostile file
MAX_DEPTH = 512  # generator blocks: each is built (on the meta device) before the header check
GENERATOR_INTS = ("d_model", "depth", "head_dim", "token_dim", "dim_accumulation", "mlp_ratio")
TARGET_KINDS = ("linear", "conv2d", "experts")


def integer(value, field: str, where, low: int = 1, high: int = MAX_SIZE) -> int:
    """``value`` if it is an int (not a bool, not a float) in [low, high], else a ValueError naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {field} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{where}: {field} must be between {low} and {high}, got {value}")
    return value


def number(value, field: str, where) -> float:
    """``value`` if it is a finite int or float (not a bool, not a string), else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: {field} must be a finite number, got {value!r}")
    return float(value)


def boolean(value, field: str, where) -> bool:
    """``value`` if it is a JSON boolean, else a ValueError (``"false"`` would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field} must be true or false, got {value!r}")
    return value


def _strings(value, field: str, where) -> None:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise ValueError(f"{where}: {field} must be a string or a list of strings, got {value!r}")


def check_generator_values(gen: dict, where) -> None:
    """A ``GeneratorConfig`` dict: integer sizes (depth at most ``MAX_DEPTH``), a finite rope theta,
    a boolean ``checkpointing``. Unknown fields are left to ``GeneratorConfig.from_dict``."""
    if not isinstance(gen, dict):
        raise ValueError(f"{where}: generator must be an object of GeneratorConfig fields, got {gen!r}")
    for field in GENERATOR_INTS:
        if field in gen:
            integer(gen[field], f"generator.{field}", where, high=MAX_DEPTH if field == "depth" else MAX_SIZE)
    if "rope_theta" in gen and number(gen["rope_theta"], "generator.rope_theta", where) <= 0:
        raise ValueError(f"{where}: generator.rope_theta must be positive, got {gen['rope_theta']!r}")
    if "checkpointing" in gen:
        boolean(gen["checkpointing"], "generator.checkpointing", where)


def check_funcmem_config(config: dict, kind: str, where) -> None:
    """The values of a funcmem ``config.json`` (``FunctionalMemory``, ``SharedLoRA`` or ``LoRABank``)."""
    integer(config["rank"], "rank", where)
    number(config["alpha"], "alpha", where)
    _strings(config["targets"], "targets", where)
    if config.get("exclude") is not None:
        _strings(config["exclude"], "exclude", where)
    if kind == "LoRABank":
        integer(config["num"], "num", where)
    if kind == "FunctionalMemory":
        integer(config["condition_dim"], "condition_dim", where)
        check_generator_values(config["generator"], where)
        grid = config.get("grid")
        if grid is not None and not (isinstance(grid, dict) and {"layers", "slots"} <= set(grid)):
            raise ValueError(f"{where}: grid must be an object with 'layers' and 'slots', got {grid!r}")
    targets = config["resolved_targets"]
    if not isinstance(targets, dict) or not targets:
        raise ValueError(f"{where}: resolved_targets must be a non-empty object of name -> [kind, in, out, experts]")
    for name, sig in targets.items():
        if not (isinstance(sig, list) and len(sig) == 4 and sig[0] in TARGET_KINDS):
            raise ValueError(f"{where}: resolved_targets[{name!r}] must be [kind, in, out, experts] with kind in "
                             f"{list(TARGET_KINDS)}, got {sig!r}")
        integer(sig[1], f"resolved_targets[{name!r}] in", where)
        integer(sig[2], f"resolved_targets[{name!r}] out", where)
        if (sig[0] == "experts") != (sig[3] is not None):
            raise ValueError(f"{where}: resolved_targets[{name!r}]: experts is set for, and only for, kind 'experts'")
        if sig[3] is not None:
            integer(sig[3], f"resolved_targets[{name!r}] experts", where)


HYWU_INTS = ("token_dim", "rank", "input_dim", "d_model", "head_dim", "dim_accumulation", "num_base_model_layers")


def check_hywu_values(config: dict, where) -> None:
    """The values of a HY-WU ``config.json`` (its fields are listed in ``shared/hywu-format.md``)."""
    for field in HYWU_INTS:
        integer(config[field], field, where)
    integer(config["num_pg_layers"], "num_pg_layers", where, high=MAX_DEPTH)
    if "output_dim" in config:
        integer(config["output_dim"], "output_dim", where)
    number(config["alpha"], "alpha", where)
    if not isinstance(config["prefix"], str):
        raise ValueError(f"{where}: prefix must be a string, got {config['prefix']!r}")


def check_peft_values(config: dict, where) -> None:
    """The values of a PEFT ``adapter_config.json`` that funcmem reads: ``r``, ``lora_alpha``, ``use_rslora``."""
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise ValueError(f"{where} lacks {field!r}")
    integer(config["r"], "r", where)
    number(config["lora_alpha"], "lora_alpha", where)
    if config.get("use_rslora") is not None:
        boolean(config["use_rslora"], "use_rslora", where)


def check_fits(expected: dict[str, tuple], file: str | Path, config_name: str = "config.json") -> None:
    """Compare the weight names and shapes a config describes with a safetensors file's header.

    Raises:
        ValueError: naming missing, unexpected and misshapen weights (both shapes), before any
            tensor is read or any model allocated.
    """
    found = safetensors_shapes(file)
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = [f"{k}: {found[k]} in the file, {tuple(v)} in the model"
             for k, v in expected.items() if k in found and found[k] != tuple(v)]
    if missing or unexpected or wrong:
        raise ValueError(f"{file} does not fit the model its {config_name} describes ({len(wrong)} shapes differ):"
                         + (f" missing {missing[:5]};" if missing else "")
                         + (f" unexpected {unexpected[:5]};" if unexpected else "")
                         + (" " + "; ".join(wrong[:3]) if wrong else ""))
