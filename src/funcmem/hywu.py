"""HY-WU parameter-generator checkpoints (``shared/hywu-format.md``): load, run, convert.

A checkpoint is a directory with ``config.json`` (``model_type: "parameter_generator"``) and
``model.safetensors`` (or shards listed in ``model.safetensors.index.json``). Its weights load into
funcmem's :class:`~funcmem.generator.ParameterGenerator` unchanged; no code of the authors is used.

    gen = funcmem.hywu.load_generator("path/to/checkpoint")
    out = gen(condition)   # {"{prefix}{layer}.{module}.lora_A": (B, ...), ..., "scale": tensor}
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn

from .generator import GeneratorConfig, ParameterGenerator
from .io import load_safetensors_dir
from .lora import LoRA
from .tokens import Entry, TokenLayout

REQUIRED = ("token_dim", "rank", "alpha", "input_dim", "d_model", "head_dim", "dim_accumulation",
            "num_base_model_layers", "num_pg_layers", "prefix", "pg_mapping")


def expand_mapping(pg_mapping: dict) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int | None]]:
    """pg_mapping -> [(module, A dims, B dims, experts)], grouped entries expanded in place.

    Returns per module ``(name, lora_A_dim, lora_B_dim, num_experts or None)``.
    """
    modules = []
    for path, spec in pg_mapping.items():
        if spec.get("type") == "grouped":
            for sub, dims in spec["sub_weights"].items():
                modules.append((f"{path}.{sub}", dims["lora_A_dim"], dims["lora_B_dim"], int(spec["num_experts"])))
        else:
            modules.append((path, spec["lora_A_dim"], spec["lora_B_dim"], None))
    return modules


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


class HywuGenerator(nn.Module):
    """A HY-WU checkpoint's generator: condition -> dict of LoRA factors and ``scale``.

    Shape:
        condition: (B, L, input_dim) or (B, 1, L, input_dim).
        output: ``{prefix}{layer}.{module}.lora_A`` (B, [E,] r, A_dim), ``.lora_B`` (B, [E,] B_dim, r),
        ``scale`` (1,).
    """

    def __init__(self, config: dict):
        super().__init__()
        missing = [k for k in REQUIRED if k not in config]
        if missing:
            raise ValueError(f"HY-WU config.json lacks fields {missing}")
        if config.get("output_dim", config["token_dim"]) != config["token_dim"]:
            raise ValueError(f"output_dim ({config['output_dim']}) must equal token_dim ({config['token_dim']})")
        self.config = dict(config)
        self.layout = layout_from_config(config)
        gcfg = GeneratorConfig(d_model=config["d_model"], depth=config["num_pg_layers"], head_dim=config["head_dim"],
                               token_dim=config["token_dim"], dim_accumulation=config["dim_accumulation"])
        self.generator = ParameterGenerator(gcfg, config["input_dim"], config["num_base_model_layers"],
                                            self.layout.tokens_per_layer, self.layout.h_a, config["rank"])
        self.scale = config["alpha"] / config["rank"]

    def generate(self, condition: Tensor) -> LoRA:
        return self.layout.detokenize(self.generator(condition), self.scale)

    def forward(self, condition: Tensor) -> dict[str, Tensor]:
        out = self.generate(condition).state_dict()
        out["scale"] = torch.tensor([self.scale], dtype=torch.float32)
        return out

    def load_weights(self, state: dict[str, Tensor]) -> None:
        """Load format-named weights; a mismatch names the offending weights and shapes."""
        own = self.generator.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
                 for k, v in own.items() if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ValueError("HY-WU weights do not fit their config.json:"
                             + (f"\n  missing: {missing[:8]}" if missing else "")
                             + (f"\n  unexpected: {unexpected[:8]}" if unexpected else "")
                             + ("\n  " + "\n  ".join(wrong[:8]) if wrong else ""))
        self.generator.load_state_dict(state)


def read_config(path: str | Path) -> dict:
    """config.json with pg_mapping's key order as written (it sets the module order)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a HY-WU checkpoint directory: no config.json")
    config = json.loads(file.read_text(), object_pairs_hook=OrderedDict)
    if config.get("model_type") not in (None, "parameter_generator"):
        raise ValueError(f"{file}: model_type is {config.get('model_type')!r}, expected 'parameter_generator'")
    return config


def load_generator(path: str | Path, dtype: torch.dtype = torch.float32) -> HywuGenerator:
    """Load a HY-WU checkpoint directory (single file or sharded safetensors)."""
    gen = HywuGenerator(read_config(path))
    gen.load_weights(load_safetensors_dir(path))
    return gen.to(dtype).eval()
