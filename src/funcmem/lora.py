"""`LoRA`: a batch of LoRA factor sets, one per sample, keyed by target module name.

Shapes, for a batch of n factor sets and rank r:

| target kind | `A`                     | `B`                  |
| ----------- | ----------------------- | -------------------- |
| Linear      | (n, r, in_features)     | (n, out_features, r) |
| Conv2d      | (n, r, in_ch * kh * kw) | (n, out_ch, r)       |
| experts     | (n, E, r, in_features)  | (n, E, out, r)       |

The update a sample's factors make to a target is ``scale * B @ A`` (per expert for experts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LoRA:
    """Per-sample LoRA factors.

    Args:
        factors: target module name -> (A, B), both with the batch dimension first.
        scale: the LoRA scale, alpha / r.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    scale: float

    def __post_init__(self):
        sizes = {a.shape[0] for a, _ in self.factors.values()} | {b.shape[0] for _, b in self.factors.values()}
        if len(sizes) > 1:
            raise ValueError(f"LoRA factors disagree on their batch size: {sorted(sizes)}")

    @property
    def batch_size(self) -> int:
        a, _ = next(iter(self.factors.values()))
        return a.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index) -> "LoRA":
        """Select samples (an int keeps a batch dimension of 1)."""
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return LoRA({k: (a[index], b[index]) for k, (a, b) in self.factors.items()}, self.scale)

    def to(self, *args, **kwargs) -> "LoRA":
        return LoRA({k: (a.to(*args, **kwargs), b.to(*args, **kwargs)) for k, (a, b) in self.factors.items()}, self.scale)

    def detach(self) -> "LoRA":
        return LoRA({k: (a.detach(), b.detach()) for k, (a, b) in self.factors.items()}, self.scale)

    def flatten(self) -> Tensor:
        """All factors of each sample in one row: (n, total_parameters)."""
        n = self.batch_size
        return torch.cat([t.reshape(n, -1) for a, b in self.factors.values() for t in (a, b)], dim=1)

    def state_dict(self) -> dict[str, Tensor]:
        """PEFT-style keys: ``{target}.lora_A`` / ``{target}.lora_B`` (batch dimension kept)."""
        out = {}
        for name, (a, b) in self.factors.items():
            out[f"{name}.lora_A"] = a
            out[f"{name}.lora_B"] = b
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor], scale: float) -> "LoRA":
        names = [k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")]
        missing = [n for n in names if f"{n}.lora_B" not in state]
        if missing:
            raise KeyError(f"lora_A without lora_B for: {missing}")
        return cls({n: (state[f"{n}.lora_A"], state[f"{n}.lora_B"]) for n in names}, float(scale))

    @staticmethod
    def cat(loras: list["LoRA"]) -> "LoRA":
        """Concatenate batches of LoRAs for the same targets and scale."""
        first = loras[0]
        if any(l.factors.keys() != first.factors.keys() or l.scale != first.scale for l in loras):
            raise ValueError("LoRA.cat needs the same targets and scale in every part")
        return LoRA({k: (torch.cat([l.factors[k][0] for l in loras]), torch.cat([l.factors[k][1] for l in loras]))
                     for k in first.factors}, first.scale)
