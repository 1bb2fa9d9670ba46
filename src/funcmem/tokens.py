"""Rank-anchored 2D tokenization of LoRA factors (the HY-WU format's token cut).

Per base-model layer, the parameter list is every slot's A, then every slot's B, in slot order.
Each parameter is flattened row-major, zero-padded at the end to a multiple of r*T and cut into
tokens of shape (r, T). A slot's token count is set by its largest instance over all layers, so
layers whose slot is smaller (or missing) are padded: every layer has the same H tokens.

    LoRA factors --tokenize--> tokens (n, N, H, r, T) --detokenize--> LoRA factors   (bit for bit)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from .lora import LoRA
from .targets import Target, group_layers


@dataclass(frozen=True)
class Entry:
    """Where one target's factors live in the token grid."""

    name: str
    layer: int
    slot: int
    a_shape: tuple[int, ...]  # per sample
    b_shape: tuple[int, ...]


class TokenLayout:
    """The token grid of N layers x H tokens of shape (rank, token_dim).

    Args:
        rank: LoRA rank r.
        token_dim: token width T.
        num_layers: N.
        slot_names: the module slots of one layer, in order.
        entries: one per target, naming its layer and slot index and its factor shapes.
    """

    def __init__(self, rank: int, token_dim: int, num_layers: int, slot_names: list[str], entries: list[Entry]):
        self.rank, self.token_dim, self.num_layers = rank, token_dim, num_layers
        self.slot_names = list(slot_names)
        self.entries = list(entries)
        chunk = rank * token_dim
        a_numel, b_numel = [0] * len(slot_names), [0] * len(slot_names)
        for e in entries:
            a_numel[e.slot] = max(a_numel[e.slot], math.prod(e.a_shape))
            b_numel[e.slot] = max(b_numel[e.slot], math.prod(e.b_shape))
        self.a_tokens = [math.ceil(n / chunk) for n in a_numel]
        self.b_tokens = [math.ceil(n / chunk) for n in b_numel]
        self.h_a, self.h_b = sum(self.a_tokens), sum(self.b_tokens)
        self._a_offset = [sum(self.a_tokens[:k]) for k in range(len(slot_names))]
        self._b_offset = [self.h_a + sum(self.b_tokens[:k]) for k in range(len(slot_names))]

    @property
    def tokens_per_layer(self) -> int:
        """H = H_A + H_B."""
        return self.h_a + self.h_b

    @classmethod
    def from_targets(cls, targets: list[Target], rank: int, token_dim: int) -> "TokenLayout":
        layers, slots = group_layers(targets)
        entries = [Entry(t.name, layers.index(t.layer), slots.index(t.slot), t.a_shape(rank), t.b_shape(rank))
                   for t in targets]
        return cls(rank, token_dim, len(layers), slots, entries)

    def _spans(self, e: Entry):
        """(offset, token count, shape) of the entry's A and of its B."""
        yield self._a_offset[e.slot], self.a_tokens[e.slot], e.a_shape
        yield self._b_offset[e.slot], self.b_tokens[e.slot], e.b_shape

    def tokenize(self, lora: LoRA) -> Tensor:
        """LoRA -> tokens (n, N, H, r, T); missing or smaller parameters are zero-padded."""
        n, chunk = lora.batch_size, self.rank * self.token_dim
        ref = next(iter(lora.factors.values()))[0]
        tokens = ref.new_zeros(n, self.num_layers, self.tokens_per_layer, chunk)
        for e in self.entries:
            if e.name not in lora.factors:
                raise KeyError(f"LoRA has no factors for target {e.name!r}")
            for (offset, count, shape), factor in zip(self._spans(e), lora.factors[e.name]):
                if tuple(factor.shape[1:]) != shape:
                    raise ValueError(f"{e.name}: factor shape {tuple(factor.shape[1:])}, layout expects {shape}")
                flat = F.pad(factor.reshape(n, -1), (0, count * chunk - math.prod(shape)))
                tokens[:, e.layer, offset : offset + count] = flat.view(n, count, chunk)
        return tokens.view(n, self.num_layers, self.tokens_per_layer, self.rank, self.token_dim)

    def token_groups(self) -> list[int]:
        """(H,) head group of each token of a layer: slot k's A tokens are group k, its B tokens
        group K + k (K slots), for generators with one output head per factor of a slot."""
        k = len(self.slot_names)
        return ([s for s in range(k) for _ in range(self.a_tokens[s])]
                + [k + s for s in range(k) for _ in range(self.b_tokens[s])])

    def detokenize(self, tokens: Tensor, scale: float) -> LoRA:
        """Tokens (n, N, H, r, T) -> LoRA with the layout's factor shapes (differentiable).

        Each layer's tokens are split once into its parameters' spans (A of every slot, then B),
        and each span's head is the parameter (the rest is padding)."""
        expected = (self.num_layers, self.tokens_per_layer, self.rank, self.token_dim)
        if tokens.dim() != 5 or tuple(tokens.shape[1:]) != expected:
            raise ValueError(f"tokens must be (n, {', '.join(map(str, expected))}), got {tuple(tokens.shape)}")
        n, chunk = tokens.shape[0], self.rank * self.token_dim
        sizes = [c * chunk for c in (*self.a_tokens, *self.b_tokens)]
        layers = tokens.reshape(n, self.num_layers, -1).unbind(1)  # N x (n, H*r*T)
        spans = {}
        factors = {}
        for e in self.entries:
            if e.layer not in spans:
                spans[e.layer] = layers[e.layer].split(sizes, dim=1)
            k = len(self.slot_names)
            a, b = (spans[e.layer][i][:, : math.prod(shape)].reshape(n, *shape)
                    for i, shape in ((e.slot, e.a_shape), (k + e.slot, e.b_shape)))
            factors[e.name] = (a, b)
        return LoRA(factors, scale)


def grid_layout(targets: list[Target], grid: dict, rank: int, token_dim: int) -> TokenLayout:
    """The token layout of an explicit grid: layer n, slot k is target ``f"{layers[n]}.{slots[k]}"``.

    Raises:
        ValueError: the resolved targets are not exactly the grid's names (both lists are named).
    """
    by_name = {t.name: t for t in targets}
    names = [[f"{layer}.{slot}" for slot in grid["slots"]] for layer in grid["layers"]]
    flat = [n for row in names for n in row]
    if set(flat) != set(by_name) or len(flat) != len(by_name):
        raise ValueError(f"the token grid names targets {sorted(set(flat) - set(by_name))[:6]} that were not "
                         f"resolved and the patterns resolved {sorted(set(by_name) - set(flat))[:6]} outside it")
    entries = [Entry(name, n, k, by_name[name].a_shape(rank), by_name[name].b_shape(rank))
               for n, row in enumerate(names) for k, name in enumerate(row)]
    return TokenLayout(rank, token_dim, len(grid["layers"]), grid["slots"], entries)
