"""Tokenization: the HY-WU token cut round-trips any factor set bit for bit."""

import math

import pytest
import torch

from funcmem.lora import LoRA
from funcmem.targets import Target
from funcmem.tokens import TokenLayout
from helpers import random_lora


def mixed_targets():
    """Layers with different slot sets and shapes, a conv and grouped experts."""
    return [
        Target("blocks.0.attn.qkv", "linear", 16, 48),
        Target("blocks.0.mlp.fc1", "linear", 16, 32),
        Target("blocks.0.moe.experts.w", "experts", 16, 24, 4),
        Target("blocks.1.attn.qkv", "linear", 16, 48),
        Target("blocks.1.mlp.fc1", "linear", 16, 64),  # wider than layer 0's: padded
        Target("blocks.2.conv", "conv2d", 8 * 9, 12),  # a slot only layer 2 has
        Target("head", "linear", 16, 10),  # no number: a layer of its own
    ]


@pytest.mark.parametrize("rank,token_dim", [(1, 8), (4, 16), (8, 5), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_round_trip_is_bit_exact(rank, token_dim, dtype):
    targets = mixed_targets()
    layout = TokenLayout.from_targets(targets, rank, token_dim)
    lora = random_lora(targets, 3, rank=rank, scale=2.0, std=1.0, dtype=dtype)
    tokens = layout.tokenize(lora)
    assert tokens.shape == (3, layout.num_layers, layout.tokens_per_layer, rank, token_dim)
    back = layout.detokenize(tokens, lora.scale)
    for name, (a, b) in lora.factors.items():
        assert torch.equal(back.factors[name][0], a) and torch.equal(back.factors[name][1], b)


def test_layout_counts_and_padding():
    rank, token_dim = 4, 16
    layout = TokenLayout.from_targets(mixed_targets(), rank, token_dim)
    assert layout.num_layers == 4  # blocks.0, blocks.1, blocks.2, head
    assert layout.slot_names == ["attn.qkv", "mlp.fc1", "moe.experts.w", "conv", "head"]
    chunk = rank * token_dim
    # mlp.fc1's B token count is set by the widest layer (64 outputs)
    assert layout.b_tokens[1] == math.ceil(64 * rank / chunk)
    assert layout.a_tokens[2] == math.ceil(4 * rank * 16 / chunk)  # experts: E * r * in
    assert layout.tokens_per_layer == layout.h_a + layout.h_b


def test_tokens_follow_the_format_order():
    """A factors then B factors; each flattened row-major and cut into (r, T) tokens."""
    t = [Target("l.0.m", "linear", 6, 5)]
    layout = TokenLayout.from_targets(t, rank=2, token_dim=4)
    a = torch.arange(12.0).view(1, 2, 6)
    b = 100 + torch.arange(10.0).view(1, 5, 2)
    tokens = layout.tokenize(LoRA({"l.0.m": (a, b)}, 1.0))
    assert layout.h_a == 2 and layout.h_b == 2  # 12 -> 2 tokens of 8, 10 -> 2 tokens of 8
    flat = tokens[0, 0].reshape(-1)
    assert torch.equal(flat[:12], torch.arange(12.0)) and torch.equal(flat[12:16], torch.zeros(4))
    assert torch.equal(flat[16:26], 100 + torch.arange(10.0)) and torch.equal(flat[26:], torch.zeros(6))


def test_shape_errors_name_the_target():
    t = [Target("l.0.m", "linear", 6, 5)]
    layout = TokenLayout.from_targets(t, rank=2, token_dim=4)
    with pytest.raises(ValueError, match="l.0.m"):
        layout.tokenize(LoRA({"l.0.m": (torch.zeros(1, 2, 7), torch.zeros(1, 5, 2))}, 1.0))
    with pytest.raises(ValueError, match="tokens must be"):
        layout.detokenize(torch.zeros(1, 1, 3, 2, 4), 1.0)
