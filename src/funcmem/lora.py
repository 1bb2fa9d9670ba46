"""`LoRA`: a batch of LoRA factor sets, one per sample, keyed by target module name.

Shapes, for a batch of n factor sets and rank r:

| target kind | `A`                     | `B`                  |
| ----------- | ----------------------- | -------------------- |
| Linear      | (n, r, in_features)     | (n, out_features, r) |
| Conv2d      | (n, r, in_ch * kh * kw) | (n, out_ch, r)       |
| experts     | (n, E, r, in_features)  | (n, E, out, r)       |

The update a sample's factors make to a target is ``scale * B @ A`` (per expert for experts).

A LoRA may carry an ``index`` (b,) that maps each input sample to a factor row, so samples that
share a LoRA (one request expanded over several images, a cache hit) share one row of factors
instead of a copy each; the mounting code then applies each distinct row once per group of samples
when that is faster (``funcmem.mount``). Without an index sample i uses row i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LoRA:
    """Per-sample LoRA factors.

    Args:
        factors: target module name -> (A, B), both with the batch (factor row) dimension first.
        scale: the LoRA scale, alpha / r.
        index: optional (b,) integer tensor, the factor row of each input sample; None: sample i
            uses row i. Not saved by ``state_dict`` (it describes a batch, not the adapter).

    ``batch_size`` counts factor rows (the LoRA batch n); ``len()`` and ``[]`` count samples (the
    index's length when there is one): ``lora[i]`` is the LoRA sample i gets.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    scale: float
    index: Tensor | None = None

    def __post_init__(self):
        sizes = {a.shape[0] for a, _ in self.factors.values()} | {b.shape[0] for _, b in self.factors.values()}
        if len(sizes) > 1:
            raise ValueError(f"LoRA factors disagree on their batch size: {sorted(sizes)}")
        if self.index is not None:
            if not isinstance(self.index, Tensor) or self.index.dim() != 1 or self.index.is_floating_point():
                raise ValueError("LoRA index must be a 1-D integer tensor (the factor row of each sample), got "
                                 f"{getattr(self.index, 'dtype', type(self.index))} "
                                 f"{tuple(getattr(self.index, 'shape', ()))}")
            self.index = self.index.long()

    @property
    def batch_size(self) -> int:
        """Factor rows n (without an index, also the number of samples)."""
        a, _ = next(iter(self.factors.values()))
        return a.shape[0]

    @property
    def num_samples(self) -> int:
        """Samples this LoRA describes: the index's length, else ``batch_size``."""
        return self.batch_size if self.index is None else self.index.shape[0]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index) -> "LoRA":
        """Select samples (an int keeps a batch dimension of 1).

        With an index, an int gathers that sample's factor row (no index left, ready for ``merge``);
        anything else selects entries of the index and keeps the factors as they are.
        """
        if isinstance(index, int):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
            if self.index is not None:
                return LoRA({k: (a[self.index[index]], b[self.index[index]]) for k, (a, b) in self.factors.items()},
                            self.scale)
        if self.index is not None:
            return LoRA(self.factors, self.scale, self.index[index])
        return LoRA({k: (a[index], b[index]) for k, (a, b) in self.factors.items()}, self.scale)

    def repeat_interleave(self, repeats: int | list[int] | Tensor) -> "LoRA":
        """Each factor row used by ``repeats`` consecutive samples (e.g. one request, several images).

        The factors are not copied: the result carries an index (rows 0,0,..,1,1,..).
        """
        rows = torch.arange(self.batch_size, device=next(iter(self.factors.values()))[0].device)
        if self.index is not None:
            rows = self.index
        return LoRA(self.factors, self.scale, rows.repeat_interleave(torch.as_tensor(repeats, device=rows.device)))

    def to(self, *args, **kwargs) -> "LoRA":
        factors = {k: (a.to(*args, **kwargs), b.to(*args, **kwargs)) for k, (a, b) in self.factors.items()}
        index = None if self.index is None else self.index.to(next(iter(factors.values()))[0].device)
        return LoRA(factors, self.scale, index)

    def detach(self) -> "LoRA":
        return LoRA({k: (a.detach(), b.detach()) for k, (a, b) in self.factors.items()}, self.scale, self.index)

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
        """Concatenate batches of LoRAs for the same targets and scale (indices are offset to match)."""
        first = loras[0]
        if any(l.factors.keys() != first.factors.keys() or l.scale != first.scale for l in loras):
            raise ValueError("LoRA.cat needs the same targets and scale in every part")
        index = None
        if any(l.index is not None for l in loras):
            offsets, parts = 0, []
            for l in loras:
                rows = l.index if l.index is not None else torch.arange(l.batch_size)
                parts.append(rows.to(next(iter(first.factors.values()))[0].device) + offsets)
                offsets += l.batch_size
            index = torch.cat(parts)
        return LoRA({k: (torch.cat([l.factors[k][0] for l in loras]), torch.cat([l.factors[k][1] for l in loras]))
                     for k in first.factors}, first.scale, index)


def _per_sample(lora: LoRA) -> LoRA:
    """One factor row per sample (rows gathered through the index, if any)."""
    if lora.index is None:
        return lora
    return LoRA({k: (a[lora.index], b[lora.index]) for k, (a, b) in lora.factors.items()}, lora.scale)


def update_gram(lora: LoRA, other: LoRA | None = None) -> Tensor:
    """Inner products of the dense updates two LoRAs make, never forming them:
    ``G[i, j] = sum over targets (and experts) of <s B_i A_i, s' B'_j A'_j>_F``, computed from r x r
    products (``<B A, B' A'> = sum((B^T B') * (A A'^T))``).

    Rows are samples (a LoRA with an index is read per sample); both LoRAs have the same targets;
    ``other`` defaults to ``lora``. Distances follow: ``||U_i - U_j||^2 = G[i, i] + G[j, j] - 2 G[i, j]``, and PCA of the
    updates is the eigendecomposition of the centred Gram (kernel PCA with a linear kernel).

    Shape: (n, m) for n samples in ``lora`` and m in ``other``.
    """
    lora = _per_sample(lora)
    other = lora if other is None else _per_sample(other)
    if set(lora.factors) != set(other.factors):
        raise ValueError(f"the LoRAs target different modules: {sorted(set(lora.factors) ^ set(other.factors))}")
    gram = 0
    for name, (a1, b1) in lora.factors.items():
        a2, b2 = other.factors[name]
        a1, b1, a2, b2 = (t.reshape(t.shape[0], -1, *t.shape[-2:]) for t in (a1, b1, a2, b2))  # E = 1 if none
        bb = torch.einsum("ieor,jeos->ijers", b1, b2)
        aa = torch.einsum("ierk,jesk->ijers", a1, a2)
        gram = gram + (bb * aa).sum((2, 3, 4))
    return gram * (lora.scale * other.scale)
