"""Shared test helpers: small bases, the mounting cases every layer kind is checked on, random LoRAs.

Fixtures live in ``conftest.py``; these are plain functions and classes (``from helpers import ...``).
"""

import torch
from torch import nn

import funcmem
from funcmem.cli import main
from funcmem.lora import LoRA


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        q, k, v = self.attn.qkv(self.norm(x)).chunk(3, dim=-1)
        x = x + torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        return x + self.mlp.fc2(torch.relu(self.mlp.fc1(x)))


class TinyTransformer(nn.Module):
    """Input (B, T, dim). Block 1's MLP is wider, so layers have different slot shapes."""

    def __init__(self, dim: int = 16, depth: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, 2 * dim if i != 1 else 3 * dim) for i in range(depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TinyConvNet(nn.Module):
    """Input (B, 3, H, W)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)])
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        for s in self.stages:
            x = torch.relu(s(x))
        return self.out(x)


class Experts(nn.Module):
    """E stacked expert matrices: token t goes through expert ``index[b, t]``.

    Input x (B, T, in), index (B, T) -> (B, T, out)."""

    def __init__(self, num_experts: int = 3, dim_in: int = 8, dim_out: int = 6):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(num_experts, dim_out, dim_in) / dim_in ** 0.5)

    def forward(self, x, index):
        w = self.gate_up[index]  # (B, T, out, in)
        return (w @ x[..., None])[..., 0]


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"experts": Experts(), "proj": nn.Linear(6, 8)}) for _ in range(2))

    def forward(self, x, index):
        for layer in self.layers:
            x = x + layer["proj"](torch.tanh(layer["experts"](x, index)))
        return x


def tiny_sd3(seed: int = 0):
    """A 2-block diffusers ``SD3Transformer2DModel`` with random weights (needs diffusers): latents
    (b, 4, 8, 8), prompt embeddings (b, L, 16), pooled (b, 8); LoRA-able ``attn.to_q/k/v``,
    ``attn.add_q/k/v_proj`` and the patch embedding ``pos_embed.proj`` (a 2x2 stride-2 Conv2d)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                           attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                           caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
                                           pos_embed_max_size=16).eval()


def randomize_b_head(fm, std: float = 0.02):
    """Give the generator a nonzero B head (at init it is zero, so every LoRA is a no-op)."""
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=std)
        fm.generator.model.proj_out_B.bias.normal_(std=std)


# ---------------------------------------------------------------- mounting cases and random LoRAs

# layer kind -> (base, target patterns, inputs(batch) -> the base's positional inputs)
CASES = {
    "linear": (TinyTransformer, ["qkv", "fc1", "fc2", "head"], lambda n: (torch.randn(n, 5, 16),)),
    "conv2d": (TinyConvNet, ["stages.*", "out"], lambda n: (torch.randn(n, 3, 9, 9),)),
    "experts": (MoE, ["experts", "proj"], lambda n: (torch.randn(n, 4, 8), torch.randint(3, (n, 4)))),
}
RANK = 3


def build(kind, dtype=torch.float32):
    """(base, FunctionalMemory of rank ``RANK`` on it, inputs) for a layer kind of ``CASES``."""
    torch.manual_seed(0)
    make, targets, inputs = CASES[kind]
    base = make().to(dtype)
    fm = funcmem.FunctionalMemory(base, targets, rank=RANK, alpha=6, condition_dim=4,
                                  generator=funcmem.GeneratorConfig(d_model=16, depth=1, head_dim=8, token_dim=8))
    return base, fm, inputs


def random_lora(source, rows, index=None, *, rank=None, scale=None, std=0.3, seed=None, dtype=torch.float32,
                requires_grad=False) -> LoRA:
    """Random factors N(0, std^2), ``rows`` per target, from a generator seeded with ``seed`` (default: ``rows``).

    ``source``: a ``FunctionalMemory`` / ``SharedLoRA`` (its targets, rank and scale), or a list of
    ``Target`` (then give ``rank``; ``scale`` defaults to 1).
    """
    targets = source
    if not isinstance(source, (list, tuple)):
        targets, rank, scale = source.targets, source.rank if rank is None else rank, source.scale if scale is None else scale
    g = torch.Generator().manual_seed(rows if seed is None else seed)
    factors = {t.name: tuple((std * torch.randn(rows, *shape, generator=g)).to(dtype).requires_grad_(requires_grad)
                             for shape in (t.a_shape(rank), t.b_shape(rank))) for t in targets}
    return LoRA(factors, 1.0 if scale is None else scale, index)


def user_error(capsys, args: list[str]) -> str:
    """Run ``funcmem ARGS``: status 2 and one ``error:`` line on stderr (after the lines saying how many
    threads and seed processes run), no traceback. Returns the error line."""
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith(("threads: ", "seed processes: "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]
