"""The parameter generator: a transformer with factorized attention that writes LoRA tokens.

It is HY-WU's architecture (``shared/hywu-format.md``), and its ``state_dict`` uses the format's
weight names, so an official checkpoint loads into it as is. With N base layers, H tokens of
shape (r, T) per layer and ``a = dim_accumulation``:

    condition (B, L, input_dim) -> hidden_in -> norm_input                       c: (B, L, D)
    queries: hw_pos (H*r, d) + layer_pos (N, d), a rows folded per token       x: (B, N, S, D)
    each block:  x += attn over N layers   (per position)      rope (n)
                 x += attn over S positions (per layer)        rope (h, w)
                 x += cross-attn to c                          rope (n, s) / (l + M, l + M)
                 x += MLP
    norm_final, unfold to rows (B, N, H, r, d), proj_out_A on the first H_A tokens, proj_out_B
    on the rest                                                  -> tokens (B, N, H, r, T)

where S = H*r/a and d = D/a. Factorized attention costs about N*S*(N+S) instead of (N*S)^2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .io import config_from_dict


@dataclass
class GeneratorConfig:
    """Size of the parameter generator.

    Args:
        d_model: generator width D.
        depth: number of blocks.
        head_dim: attention head width (heads = D / head_dim); a multiple of 4 (two rope axes).
        token_dim: width T of one parameter token.
        dim_accumulation: a, how many rank rows fold into one generator token (divides rank).
        mlp_ratio: MLP hidden width / D.
        rope_theta: rotary base.
        checkpointing: recompute each block in backward (activation checkpointing).
        attention: "factorized" (HY-WU) or "full" (one attention over all N*S tokens, for
            measuring what factorization saves; not a checkpoint format).
    """

    d_model: int = 128
    depth: int = 2
    head_dim: int = 32
    token_dim: int = 64
    dim_accumulation: int = 1
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    checkpointing: bool = False
    attention: str = "factorized"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        return config_from_dict(cls, d)


# ---------------------------------------------------------------- rotary positions


def rope_angles(positions: Tensor, widths: list[int], theta: float) -> Tensor:
    """Rotation angles (L, sum(widths)/2) for positions (L, n_axes), axis k over widths[k] channels."""
    parts = []
    for k, m in enumerate(widths):
        freqs = theta ** (-torch.arange(0, m, 2, dtype=torch.float64) / m)  # pair i: theta^(-2i/m)
        parts.append(positions[:, k, None].double() * freqs)
    return torch.cat(parts, dim=-1).float()


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (..., L, hd) by angles (L, hd/2)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


# ---------------------------------------------------------------- blocks


class Attention(nn.Module):
    """Multi-head attention with rope on q and k; ``W_q, W_k, W_v, W_o`` as in the format."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, context: Tensor, q_angles: Tensor, k_angles: Tensor) -> Tensor:
        """x (B, Lq, D) attends to context (B, Lk, D) -> (B, Lq, D)."""
        def heads(t: Tensor) -> Tensor:  # (B, L, D) -> (B, h, L, hd)
            return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

        q = apply_rope(heads(self.W_q(x)), q_angles)
        k = apply_rope(heads(self.W_k(context)), k_angles)
        out = F.scaled_dot_product_attention(q, k, heads(self.W_v(context)))
        return self.W_o(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm block: layer attention, within-layer attention, cross-attention, MLP."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int, full_attention: bool = False):
        super().__init__()
        self.full_attention = full_attention
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.RMSNorm(dim, eps=1e-6) for _ in range(4))
        self.self_attn_n = Attention(dim, head_dim)
        self.self_attn_hw = Attention(dim, head_dim)
        self.self_attn_cross = Attention(dim, head_dim)
        self.feed_forward = FeedForward(dim, mlp_ratio * dim)

    def forward(self, x: Tensor, c: Tensor, rope: dict[str, Tensor]) -> Tensor:
        """x (B, N, S, D), c (B, L, D) -> (B, N, S, D)."""
        b, n, s, d = x.shape
        if self.full_attention:  # one attention over all N*S tokens, then nothing within a layer
            h = self.norm1(x).reshape(b, n * s, d)
            x = x + self.self_attn_n(h, h, rope["cross_q"], rope["cross_q"]).view(b, n, s, d)
        else:
            h = self.norm1(x).transpose(1, 2).reshape(b * s, n, d)  # across layers, per position
            x = x + self.self_attn_n(h, h, rope["n"], rope["n"]).view(b, s, n, d).transpose(1, 2)
            h = self.norm2(x).reshape(b * n, s, d)  # across positions, per layer
            x = x + self.self_attn_hw(h, h, rope["hw"], rope["hw"]).view(b, n, s, d)
        h = self.norm3(x).reshape(b, n * s, d)
        x = x + self.self_attn_cross(h, c, rope["cross_q"], rope["cross_k"]).view(b, n, s, d)
        return x + self.feed_forward(self.norm4(x))


class _Trunk(nn.Module):
    """Holds the weights named ``model.*`` in the format."""

    def __init__(self, cfg: GeneratorConfig, num_layers: int, positions: int):
        super().__init__()
        d, full = cfg.d_model // cfg.dim_accumulation, cfg.attention == "full"
        self.norm_input = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.hw_pos = nn.Embedding(positions, d)
        self.layer_pos = nn.Embedding(num_layers, d)
        self.norm_tokens = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.head_dim, cfg.mlp_ratio, full) for _ in range(cfg.depth))
        self.norm_final = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.proj_out_A = nn.Linear(d, cfg.token_dim)
        self.proj_out_B = nn.Linear(d, cfg.token_dim)


class ParameterGenerator(nn.Module):
    """Condition -> LoRA tokens.

    Args:
        config: generator size.
        input_dim: width of the condition vectors.
        num_layers: N, base layers that receive LoRA.
        tokens_per_layer: H, parameter tokens per layer.
        a_tokens: H_A, how many of a layer's tokens are A factors (they use ``proj_out_A``).
        rank: LoRA rank r.

    Shape:
        condition: (B, L, input_dim), (B, input_dim) or (B, 1, L, input_dim).
        output: (B, N, H, r, token_dim).
    """

    def __init__(self, config: GeneratorConfig, input_dim: int, num_layers: int, tokens_per_layer: int,
                 a_tokens: int, rank: int):
        super().__init__()
        cfg = config
        if cfg.d_model % cfg.head_dim or cfg.head_dim % 4:
            raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of head_dim ({cfg.head_dim}), "
                             "and head_dim a multiple of 4")
        if rank % cfg.dim_accumulation or cfg.d_model % cfg.dim_accumulation:
            raise ValueError(f"dim_accumulation ({cfg.dim_accumulation}) must divide rank ({rank}) and d_model")
        if cfg.attention not in ("factorized", "full"):
            raise ValueError(f"attention must be 'factorized' or 'full', got {cfg.attention!r}")
        self.config, self.input_dim, self.rank = cfg, input_dim, rank
        self.num_layers, self.tokens_per_layer, self.a_tokens = num_layers, tokens_per_layer, a_tokens
        self.hidden_in = nn.Linear(input_dim, cfg.d_model)
        self.model = _Trunk(cfg, num_layers, tokens_per_layer * rank)
        self._init_weights()

    def _init_weights(self):
        for p in (self.model.hw_pos.weight, self.model.layer_pos.weight):
            nn.init.normal_(p, std=0.02)
        # B starts at zero, as LoRA's B: the mounted base equals the base at step 0.
        nn.init.zeros_(self.model.proj_out_B.weight)
        nn.init.zeros_(self.model.proj_out_B.bias)

    @property
    def tokens_per_position(self) -> int:
        """S, generator tokens per layer."""
        return self.tokens_per_layer * self.rank // self.config.dim_accumulation

    def _rope(self, cond_len: int, device) -> dict[str, Tensor]:
        cfg, n, s = self.config, self.num_layers, self.tokens_per_position
        grid_h, grid_w = self.tokens_per_layer, self.rank // cfg.dim_accumulation
        half = [cfg.head_dim // 2] * 2
        nn_pos = torch.arange(n)[:, None]
        hw_pos = torch.stack(torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij"), -1).view(-1, 2)
        q_pos = torch.stack(torch.meshgrid(torch.arange(n), torch.arange(s), indexing="ij"), -1).view(-1, 2)
        k_pos = (torch.arange(cond_len) + max(grid_h, grid_w))[:, None].expand(-1, 2)
        angles = {"n": rope_angles(nn_pos, [cfg.head_dim], cfg.rope_theta),
                  "hw": rope_angles(hw_pos, half, cfg.rope_theta),
                  "cross_q": rope_angles(q_pos, half, cfg.rope_theta),
                  "cross_k": rope_angles(k_pos, half, cfg.rope_theta)}
        return {k: v.to(device) for k, v in angles.items()}

    def query_tokens(self) -> Tensor:
        """Learned queries (N, S, D): hw_pos + layer_pos, a rows folded into each token."""
        m, a = self.model, self.config.dim_accumulation
        pos = m.hw_pos.weight[None] + m.layer_pos.weight[:, None]  # (N, H*r, d)
        return m.norm_tokens(pos.reshape(self.num_layers, self.tokens_per_position, a * pos.shape[-1]))

    def forward(self, condition: Tensor) -> Tensor:
        if condition.dim() == 4 and condition.shape[1] == 1:
            condition = condition.squeeze(1)
        if condition.dim() == 2:
            condition = condition[:, None]
        if condition.dim() != 3 or condition.shape[-1] != self.input_dim:
            raise ValueError(f"condition must be (B, L, {self.input_dim}), got {tuple(condition.shape)}")
        m, b = self.model, condition.shape[0]
        c = m.norm_input(self.hidden_in(condition))  # (B, L, D)
        x = self.query_tokens().expand(b, -1, -1, -1)  # (B, N, S, D)
        rope = self._rope(condition.shape[1], condition.device)
        for block in m.blocks:
            if self.config.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        x = m.norm_final(x)
        rows = x.reshape(b, self.num_layers, self.tokens_per_layer, self.rank, -1)  # (B, N, H, r, d)
        h_a = self.a_tokens
        return torch.cat([m.proj_out_A(rows[:, :, :h_a]), m.proj_out_B(rows[:, :, h_a:])], dim=2)

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def attention_flops(num_layers: int, positions: int, d_model: int, full: bool) -> int:
    """Score + mix FLOPs of one block's self-attention: ~N*S*(N+S)*D factorized, (N*S)^2*D full."""
    tokens = num_layers * positions
    pairs = tokens * tokens if full else tokens * (num_layers + positions)
    return 4 * pairs * d_model
