"""``update_gram``: inner products of the dense updates s B A from r x r products, checked against
the dense updates themselves (Linear, Conv2d-shaped and expert factors, shared rows through an index)."""

import pytest
import torch

from funcmem.lora import LoRA, update_gram


def dense(lora: LoRA) -> torch.Tensor:
    """(n, sum of out * in): every target's s B A, flattened; rows follow the index if any."""
    rows = lora.index if lora.index is not None else torch.arange(lora.batch_size)
    return torch.cat([(lora.scale * b[rows] @ a[rows]).flatten(1) for a, b in lora.factors.values()], 1)


def make(n: int, seed: int, scale: float = 0.5) -> LoRA:
    g = torch.Generator().manual_seed(seed)
    return LoRA({"linear": (torch.randn(n, 2, 7, generator=g), torch.randn(n, 3, 2, generator=g)),
                 "conv": (torch.randn(n, 2, 4 * 9, generator=g), torch.randn(n, 5, 2, generator=g)),
                 "experts": (torch.randn(n, 4, 2, 3, generator=g), torch.randn(n, 4, 6, 2, generator=g))}, scale)


def test_gram_matches_the_dense_updates():
    a, b = make(5, 0), make(3, 1, scale=2.0)
    torch.testing.assert_close(update_gram(a), dense(a) @ dense(a).T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(update_gram(a, b), dense(a) @ dense(b).T, rtol=1e-5, atol=1e-4)


def test_index_rows_are_read_per_sample():
    a = make(3, 2).repeat_interleave([2, 1, 3])
    assert update_gram(a).shape == (6, 6)
    torch.testing.assert_close(update_gram(a), dense(a) @ dense(a).T, rtol=1e-5, atol=1e-4)


def test_gram_sees_updates_not_factors():
    """B R and R^-1 A make the same update: distance zero although the factors differ."""
    a = make(1, 3)
    r = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    rotated = LoRA({k: (torch.linalg.inv(r) @ fa, fb @ r) for k, (fa, fb) in a.factors.items()}, a.scale)
    g = update_gram(LoRA.cat([a, rotated]))
    assert (g[0, 0] + g[1, 1] - 2 * g[0, 1]).abs() < 1e-3 * g[0, 0]
    assert (a.flatten() - rotated.flatten()).abs().max() > 0.1


def test_different_targets_are_refused():
    a = make(2, 0)
    other = LoRA({"linear": a.factors["linear"]}, a.scale)
    with pytest.raises(ValueError, match="different modules"):
        update_gram(a, other)
