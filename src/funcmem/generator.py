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

import math
import warnings
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .blocks import Block, rope_angles, rope_tables
from .io import config_from_dict


@dataclass
class GeneratorConfig:
    """Size and design of the parameter generator.

    The format fields (HY-WU's) set the size; the design options after them are funcmem's own
    (``funcmem.hywu`` builds the format's design: ``FORMAT_DESIGN``, and a checkpoint with other
    values cannot be converted to the format).

    Args:
        d_model: generator width D.
        depth: number of blocks.
        head_dim: attention head width (heads = D / head_dim); a multiple of 4 (two rope axes).
        token_dim: width T of one parameter token. A generator row has d = D / dim_accumulation
            numbers and the output head maps it to T: with d < T every generated T-chunk lies in
            one (d + 1)-dimensional affine subspace, a bottleneck (``head_bottleneck``).
        dim_accumulation: a, how many rank rows fold into one generator token (divides rank).
        mlp_ratio: MLP hidden width / D.
        rope_theta: rotary base.
        checkpointing: recompute each block in backward (activation checkpointing).
        attention: "factorized" (HY-WU) or "full" (one attention over all N*S tokens, for
            measuring what factorization saves; not a checkpoint format).
        head: output heads: "shared" (HY-WU: ``proj_out_A`` for every A token, ``proj_out_B``
            for every B token), "slot" (one head per factor of each slot), "layer_slot" (one per
            factor of each slot of each layer).
        basis: J > 0 adds J learned LoRAs (in token space) mixed by the pooled condition:
            tokens += sum_j w_j(c) U_j, the U_j's A tokens random at init (conditions start with
            different A factors, as a bank's LoRAs do), their B tokens zero. 0: none (HY-WU).
        modulation: scale and shift the cross-attention and MLP inputs of every block by the
            pooled condition (adaLN, zero-initialised), besides the cross-attention.
        factor_init: "hywu" (the A head at torch's Linear init: generated A entries about 10x a
            LoRA's) or "lora" (A heads scaled so generated A starts at the Kaiming-uniform scale
            of a LoRA's A for its fan-in).
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
    head: str = "shared"
    basis: int = 0
    modulation: bool = False
    factor_init: str = "hywu"

    def __post_init__(self):
        checks = {"attention": ("factorized", "full"), "head": HEADS, "factor_init": ("hywu", "lora")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GeneratorConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.basis < 0:
            raise ValueError(f"GeneratorConfig.basis must be >= 0, got {self.basis}")

    @property
    def row_dim(self) -> int:
        """d = D / a, the numbers per generator row that the head maps to a token row of T."""
        return self.d_model // self.dim_accumulation

    @property
    def head_bottleneck(self) -> bool:
        """True when d < T: the output head narrows (see ``token_dim``)."""
        return self.row_dim < self.token_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        """A config from a dict; design fields it lacks (configs written before they existed)
        take the format's design, so old checkpoints load as they were trained."""
        return config_from_dict(cls, {**FORMAT_DESIGN, **d})


HEADS = ("shared", "slot", "layer_slot")


class HeadBottleneckWarning(UserWarning):
    """A new generator whose rows are narrower than its tokens (``GeneratorConfig.head_bottleneck``)."""


def check_head(config: GeneratorConfig, stacklevel: int = 3) -> None:
    """Warn (``HeadBottleneckWarning``) when d = d_model / dim_accumulation < token_dim."""
    if config.head_bottleneck:
        d, t = config.row_dim, config.token_dim
        warnings.warn(f"generator rows have d_model / dim_accumulation = {d} numbers but tokens token_dim = {t}: "
                      f"every generated {t}-chunk of every factor lies in one {d + 1}-dimensional affine subspace; "
                      f"choose token_dim <= {d} (or a wider d_model or a smaller dim_accumulation)",
                      HeadBottleneckWarning, stacklevel=stacklevel)
# The HY-WU format's design (``funcmem.hywu`` builds exactly this).
FORMAT_DESIGN = {"mlp_ratio": 4, "rope_theta": 10000.0, "attention": "factorized", "head": "shared", "basis": 0,
                 "modulation": False, "factor_init": "hywu"}


class _Trunk(nn.Module):
    """Holds the weights named ``model.*`` in the format (and funcmem's own heads beside them)."""

    def __init__(self, cfg: GeneratorConfig, num_layers: int, positions: int, groups: int):
        super().__init__()
        d, full = cfg.row_dim, cfg.attention == "full"
        self.norm_input = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.hw_pos = nn.Embedding(positions, d)
        self.layer_pos = nn.Embedding(num_layers, d)
        self.norm_tokens = nn.RMSNorm(cfg.d_model, eps=1e-6)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.head_dim, cfg.mlp_ratio, full, cfg.modulation)
                                    for _ in range(cfg.depth))
        self.norm_final = nn.RMSNorm(cfg.d_model, eps=1e-6)
        if cfg.head == "shared":
            self.proj_out_A = nn.Linear(d, cfg.token_dim)
            self.proj_out_B = nn.Linear(d, cfg.token_dim)
        else:  # one Linear(d -> T) per group (factor of a slot), per layer with "layer_slot"
            copies = num_layers if cfg.head == "layer_slot" else 1
            bound = 1 / math.sqrt(d)  # nn.Linear's init
            self.head_weight = nn.Parameter(torch.empty(copies, groups, d, cfg.token_dim).uniform_(-bound, bound))
            self.head_bias = nn.Parameter(torch.empty(copies, groups, cfg.token_dim).uniform_(-bound, bound))


class ParameterGenerator(nn.Module):
    """Condition -> LoRA tokens.

    Args:
        config: generator size and design.
        input_dim: width of the condition vectors.
        num_layers: N, base layers that receive LoRA.
        tokens_per_layer: H, parameter tokens per layer.
        a_tokens: H_A, how many of a layer's tokens are A factors (they use ``proj_out_A``).
        rank: LoRA rank r.
        token_groups: (H,) the head group of each token of a layer, for ``head`` "slot" and
            "layer_slot" (the layout's ``token_groups()``: one group per factor of each slot);
            default: A tokens group 0, B tokens group 1. Groups of B tokens start at zero.

    Shape:
        condition: (B, L, input_dim), (B, input_dim) or (B, 1, L, input_dim).
        mask: optional (B, L) bool, True for real condition tokens (padding is not attended to).
        output: (B, N, H, r, token_dim).
    """

    def __init__(self, config: GeneratorConfig, input_dim: int, num_layers: int, tokens_per_layer: int,
                 a_tokens: int, rank: int, token_groups: list[int] | None = None):
        super().__init__()
        cfg = config
        if cfg.d_model % cfg.head_dim or cfg.head_dim % 4:
            raise ValueError(f"d_model ({cfg.d_model}) must be a multiple of head_dim ({cfg.head_dim}), "
                             "and head_dim a multiple of 4")
        if rank % cfg.dim_accumulation or cfg.d_model % cfg.dim_accumulation:
            raise ValueError(f"dim_accumulation ({cfg.dim_accumulation}) must divide rank ({rank}) and d_model")
        groups = list(token_groups) if token_groups is not None else [0] * a_tokens + [1] * (tokens_per_layer - a_tokens)
        if len(groups) != tokens_per_layer:
            raise ValueError(f"token_groups has {len(groups)} entries for {tokens_per_layer} tokens per layer")
        self.config, self.input_dim, self.rank = cfg, input_dim, rank
        self.num_layers, self.tokens_per_layer, self.a_tokens = num_layers, tokens_per_layer, a_tokens
        self.hidden_in = nn.Linear(input_dim, cfg.d_model)
        self.model = _Trunk(cfg, num_layers, tokens_per_layer * rank, max(groups) + 1)
        self.register_buffer("token_groups", torch.tensor(groups, dtype=torch.long), persistent=False)
        if cfg.basis:
            self.basis_coef = nn.Linear(cfg.d_model, cfg.basis)
            self.basis = nn.Parameter(torch.zeros(cfg.basis, num_layers, tokens_per_layer, rank, cfg.token_dim))
        self._rope_cache: dict = {}
        self._init_weights()

    def _init_weights(self):
        for p in (self.model.hw_pos.weight, self.model.layer_pos.weight):
            nn.init.normal_(p, std=0.02)
        if self.config.basis:
            # Mixing weights of about unit norm; the basis's A tokens random at the A head's output
            # scale (std 1/sqrt(3)), so that conditions start with different A factors, as the LoRAs
            # of a bank do; its B tokens zero (the base at step 0).
            with torch.no_grad():
                self.basis_coef.weight.mul_(math.sqrt(3 / self.config.basis))
                self.basis[:, :, : self.a_tokens].normal_(std=1 / math.sqrt(3))
        # B starts at zero, as LoRA's B: the mounted base equals the base at step 0.
        if self.config.head == "shared":
            nn.init.zeros_(self.model.proj_out_B.weight)
            nn.init.zeros_(self.model.proj_out_B.bias)
        else:
            b_groups = self.token_groups[self.a_tokens:].unique()
            with torch.no_grad():
                self.model.head_weight[:, b_groups] = 0
                self.model.head_bias[:, b_groups] = 0

    @torch.no_grad()
    def init_factor_scale(self, a_fan_in: dict[int, float]) -> None:
        """Scale the A heads so generated A entries start at a LoRA A's Kaiming-uniform scale.

        Args:
            a_fan_in: {head group: fan-in of the A factors it writes}; for the shared head one
                entry (group 0) with an effective fan-in for all A factors.

        Head outputs have std ~ 1/sqrt(3) (unit-RMS rows, torch's Linear init); a Kaiming-uniform
        A row of fan-in f has std 1/sqrt(3 f): the head is scaled by 1/sqrt(f).
        """
        for group, fan_in in a_fan_in.items():
            factor = 1 / math.sqrt(fan_in)
            if self.config.basis:  # the basis's A tokens of this group (all A tokens for the shared head)
                tokens = (torch.arange(self.a_tokens) if self.config.head == "shared"
                          else (self.token_groups == group).nonzero().flatten())
                self.basis[:, :, tokens] *= factor
            if self.config.head == "shared":
                self.model.proj_out_A.weight.mul_(factor)
                self.model.proj_out_A.bias.mul_(factor)
            else:
                self.model.head_weight[:, group] *= factor
                self.model.head_bias[:, group] *= factor

    @property
    def tokens_per_position(self) -> int:
        """S, generator tokens per layer."""
        return self.tokens_per_layer * self.rank // self.config.dim_accumulation

    def _rope(self, cond_len: int, device) -> dict[str, tuple[Tensor, Tensor]]:
        """Rope tables of every attention, cached per condition length, device and inference mode
        (tables made under ``torch.inference_mode`` cannot be saved for a backward pass)."""
        key = (cond_len, str(device), torch.is_inference_mode_enabled())
        if key in self._rope_cache:
            return self._rope_cache[key]
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
        tables = {k: tuple(t.to(device) for t in rope_tables(v)) for k, v in angles.items()}
        if len(self._rope_cache) > 64:  # many condition lengths: keep the cache small
            self._rope_cache.clear()
        self._rope_cache[key] = tables
        return tables

    def query_tokens(self) -> Tensor:
        """Learned queries (N, S, D): hw_pos + layer_pos, a rows folded into each token."""
        m, a = self.model, self.config.dim_accumulation
        pos = m.hw_pos.weight[None] + m.layer_pos.weight[:, None]  # (N, H*r, d)
        return m.norm_tokens(pos.reshape(self.num_layers, self.tokens_per_position, a * pos.shape[-1]))

    def forward(self, condition: Tensor, mask: Tensor | None = None) -> Tensor:
        if condition.dim() == 4 and condition.shape[1] == 1:
            condition = condition.squeeze(1)
        if condition.dim() == 2:
            condition = condition[:, None]
        if condition.dim() != 3 or condition.shape[-1] != self.input_dim:
            raise ValueError(f"condition must be (B, L, {self.input_dim}), got {tuple(condition.shape)}")
        if mask is not None and (mask.shape != condition.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor {tuple(condition.shape[:2])} (B, L), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
        m, b = self.model, condition.shape[0]
        c = m.norm_input(self.hidden_in(condition))  # (B, L, D)
        pooled = None
        if self.config.modulation or self.config.basis:  # mean over real condition tokens (B, D)
            w = torch.ones(c.shape[:2], device=c.device, dtype=c.dtype) if mask is None else mask.to(c.dtype)
            pooled = (c * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        rope = self._rope(condition.shape[1], condition.device)
        x = self.query_tokens()[None]  # (1, N, S, D): block 0's self-attention is the same for every sample
        for block in m.blocks:  # through the module call: FSDP's hooks gather its weights
            ckpt = self.config.checkpointing and torch.is_grad_enabled()
            x = (checkpoint(block, x, c, rope, mask, pooled, use_reentrant=False) if ckpt
                 else block(x, c, rope, mask, pooled))
        x = m.norm_final(x)
        rows = x.reshape(b, self.num_layers, self.tokens_per_layer, self.rank, -1)  # (B, N, H, r, d)
        tokens = self._heads(rows)
        if self.config.basis:
            coef = self.basis_coef(pooled)  # (B, J)
            tokens = tokens + (coef @ self.basis.flatten(1)).view_as(tokens)
        return tokens

    def _heads(self, rows: Tensor) -> Tensor:
        """Rows (B, N, H, r, d) -> tokens (B, N, H, r, T)."""
        m = self.model
        if self.config.head == "shared":
            h_a = self.a_tokens
            return torch.cat([m.proj_out_A(rows[:, :, :h_a]), m.proj_out_B(rows[:, :, h_a:])], dim=2)
        w = m.head_weight[:, self.token_groups]  # (1 or N, H, d, T)
        bias = m.head_bias[:, self.token_groups]  # (1 or N, H, T)
        return torch.einsum("bnhrd,nhdt->bnhrt", rows, w.expand(self.num_layers, -1, -1, -1)) + bias[:, :, None]

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def count_trunk_parameters(self) -> int:
        """Parameters of the format's generator of the same size (the trunk); what funcmem's own
        design options add (heads beyond the two shared ones, the basis, the modulation) is the rest."""
        own = sum(p.numel() for name, p in self.named_parameters()
                  if name.startswith(("model.head_", "basis")) or ".modulation." in name)
        if self.config.head != "shared":
            own -= 2 * (self.config.row_dim + 1) * self.config.token_dim
        return self.count_parameters() - own


def attention_flops(num_layers: int, positions: int, d_model: int, full: bool) -> int:
    """Score + mix FLOPs of one block's self-attention: ~N*S*(N+S)*D factorized, (N*S)^2*D full."""
    tokens = num_layers * positions
    pairs = tokens * tokens if full else tokens * (num_layers + positions)
    return 4 * pairs * d_model
