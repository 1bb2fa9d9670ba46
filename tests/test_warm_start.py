"""Warm start: the generator learns to reproduce a bank's updates B A on the bank's keys."""

import copy

import pytest
import torch

import funcmem
from funcmem.warm_start import relative_error, update_distance, warm_start
from helpers import TinyTransformer

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2, basis=4)


def trained_like_bank(k=4, seed=0):
    """A bank on a tiny transformer with random (trained-looking) factors."""
    torch.manual_seed(seed)
    base = TinyTransformer()
    bank = funcmem.LoRABank(copy.deepcopy(base), ["qkv", "fc2"], rank=4, alpha=4, num=k)
    with torch.no_grad():
        for b in bank.lora_B.values():
            b.normal_(std=0.3)
    return base, bank


def test_gram_distance_is_the_dense_distance():
    _, bank = trained_like_bank()
    lora = bank.lora()
    other = funcmem.LoRA({k: (a.flip(0), b.flip(0) * 2) for k, (a, b) in lora.factors.items()}, 0.5)
    dist, norm = update_distance(other, lora)
    dense = sum(((0.5 * ob @ oa - lora.scale * b @ a) ** 2).flatten(1).sum(1)
                for (oa, ob), (a, b) in zip(other.factors.values(), lora.factors.values()))
    torch.testing.assert_close(dist, dense, rtol=1e-4, atol=1e-5)
    ref = sum(((lora.scale * b @ a) ** 2).flatten(1).sum(1) for a, b in lora.factors.values())
    torch.testing.assert_close(norm, ref)


def test_generator_reproduces_the_banks_products_on_its_keys(one_thread):
    base, bank = trained_like_bank()
    torch.manual_seed(1)
    fm = funcmem.FunctionalMemory(base, ["qkv", "fc2"], rank=4, alpha=4, condition_dim=4, generator=GEN)
    keys = torch.eye(4)[:, None]  # one-hot labels: condition k calls up LoRA k
    before = relative_error(fm, bank, keys)
    assert torch.all(before > 0.99)  # B starts at zero: nothing of the bank yet
    report = warm_start(fm, bank, keys, steps=300, lr=1e-2)
    after = relative_error(fm, bank, keys)
    print(f"warm start: relative error of B A {before.mean():.3f} -> {after.mean():.4f} in {report['steps']} steps")
    assert report["max_relative_error"] == pytest.approx(after.max().item(), rel=1e-4)
    assert after.max() < 0.05
    x = torch.randn(4, 5, 16)  # the functions agree too: generated LoRA k on the base ~ bank LoRA k
    with torch.no_grad():
        got, want = fm(keys, x), bank(torch.arange(4), x)
    assert (got - want).norm() < 0.05 * (want - bank.base(x)).norm()


def test_warm_start_refuses_another_rank_or_index():
    base, bank = trained_like_bank()
    fm = funcmem.FunctionalMemory(base, ["qkv", "fc2"], rank=2, condition_dim=4,
                                  generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16))
    with pytest.raises(ValueError, match="same targets and rank"):
        warm_start(fm, bank, torch.eye(4)[:, None], steps=1)
    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv", "fc2"], rank=4, condition_dim=4, generator=GEN)
    with pytest.raises(ValueError, match=r"index must be \(4,\) with values in \[0, 4\)"):
        warm_start(fm, bank, torch.eye(4)[:, None], torch.tensor([0, 1, 2, 9]), steps=1)
