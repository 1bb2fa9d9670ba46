"""The parameter generator's transformer pieces: rotary positions, attention, feed-forward, and
the block that applies them to the LoRA query tokens (``generator.ParameterGenerator``).

    x (B, N, S, D) --self-attention over N layers, then over S positions--> x
    x --cross-attention to the condition c (B, L, D), MLP--> x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ---------------------------------------------------------------- rotary positions


def rope_angles(positions: Tensor, widths: list[int], theta: float) -> Tensor:
    """Rotation angles (L, sum(widths)/2) for positions (L, n_axes), axis k over widths[k] channels."""
    parts = []
    for k, m in enumerate(widths):
        freqs = theta ** (-torch.arange(0, m, 2, dtype=torch.float64) / m)  # pair i: theta^(-2i/m)
        parts.append(positions[:, k, None].double() * freqs)
    return torch.cat(parts, dim=-1).float()


def rope_tables(angles: Tensor) -> tuple[Tensor, Tensor]:
    """(cos, signed sin) tables (L, hd) for ``apply_rope``: pair i of ``angles`` (L, hd/2) gives
    channels 2i, 2i+1 the cosine (c, c) and the sine (-s, s)."""
    cos, sin = angles.cos(), angles.sin()
    return cos.repeat_interleave(2, -1), torch.stack((-sin, sin), -1).flatten(-2)


def apply_rope(x: Tensor, table: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate adjacent channel pairs of x (..., L, hd): (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).

    ``table`` is ``rope_tables(angles)``; computed as x * cos + swap(x) * signed_sin (the same
    floats as the pairwise formula)."""
    cos, sin = table
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return (xf * cos + swapped * sin).type_as(x)


# ---------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head attention with rope on q and k; ``W_q, W_k, W_v, W_o`` as in the format."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, context: Tensor, q_rope, k_rope, mask: Tensor | None = None) -> Tensor:
        """x (B, Lq, D) attends to context (B, Lk, D) -> (B, Lq, D); mask (B, Lk) bool, True = a real key."""
        def heads(t: Tensor) -> Tensor:  # (B, L, D) -> (B, h, L, hd)
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q = apply_rope(heads(self.W_q(x)), q_rope)
        k = apply_rope(heads(self.W_k(context)), k_rope)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, heads(self.W_v(context)), attn_mask=attn_mask)
        return self.W_o(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: layer attention, within-layer attention, cross-attention, MLP.

    With ``modulation`` the cross-attention's and the MLP's normalised inputs are scaled and
    shifted by the pooled condition: ``norm(x) * (1 + scale(p)) + shift(p)`` (zero-initialised).
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int, full_attention: bool = False,
                 modulation: bool = False):
        super().__init__()
        self.full_attention = full_attention
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.RMSNorm(dim, eps=1e-6) for _ in range(4))
        self.self_attn_n = Attention(dim, head_dim)
        self.self_attn_hw = Attention(dim, head_dim)
        self.self_attn_cross = Attention(dim, head_dim)
        self.feed_forward = FeedForward(dim, mlp_ratio * dim)
        if modulation:
            self.modulation = nn.Linear(dim, 4 * dim)
            nn.init.zeros_(self.modulation.weight)
            nn.init.zeros_(self.modulation.bias)

    def forward_self(self, x: Tensor, rope: dict) -> Tensor:
        """The condition-independent half: attention across layers and within each layer.
        x (B, N, S, D) -> (B, N, S, D)."""
        b, n, s, d = x.shape
        if self.full_attention:  # one attention over all N*S tokens, then nothing within a layer
            h = self.norm1(x).reshape(b, n * s, d)
            return x + self.self_attn_n(h, h, rope["cross_q"], rope["cross_q"]).view(b, n, s, d)
        h = self.norm1(x).transpose(1, 2).reshape(b * s, n, d)  # across layers, per position
        x = x + self.self_attn_n(h, h, rope["n"], rope["n"]).view(b, s, n, d).transpose(1, 2)
        h = self.norm2(x).reshape(b * n, s, d)  # across positions, per layer
        return x + self.self_attn_hw(h, h, rope["hw"], rope["hw"]).view(b, n, s, d)

    def forward_condition(self, x: Tensor, c: Tensor, rope: dict, mask: Tensor | None = None,
                          pooled: Tensor | None = None) -> Tensor:
        """The half that reads the condition: cross-attention to c (B, L, D), then the MLP."""
        b, n, s, d = x.shape
        if hasattr(self, "modulation"):
            s3, t3, s4, t4 = self.modulation(F.silu(pooled))[:, None, None].chunk(4, -1)  # (B, 1, 1, D) each
            h3, h4 = lambda z: self.norm3(z) * (1 + s3) + t3, lambda z: self.norm4(z) * (1 + s4) + t4
        else:
            h3, h4 = self.norm3, self.norm4
        h = h3(x).reshape(b, n * s, d)
        x = x + self.self_attn_cross(h, c, rope["cross_q"], rope["cross_k"], mask).view(b, n, s, d)
        return x + self.feed_forward(h4(x))

    def forward(self, x: Tensor, c: Tensor, rope: dict, mask: Tensor | None = None,
                pooled: Tensor | None = None) -> Tensor:
        """x (B, N, S, D), c (B, L, D) -> (B, N, S, D). An x of batch 1 (the query tokens, the same
        for every sample) runs the condition-free half once and is expanded to c's batch."""
        x = self.forward_self(x, rope)
        return self.forward_condition(x.expand(c.shape[0], -1, -1, -1), c, rope, mask, pooled)
