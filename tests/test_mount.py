"""Mounting: per-sample LoRA equals each sample run alone with its LoRA merged into the weights."""

import copy

import pytest
import torch

import funcmem
from funcmem.lora import LoRA
from helpers import CASES, TinyTransformer, build, random_lora


@pytest.mark.parametrize("kind", list(CASES))
def test_per_sample_equals_merged(kind):
    base, fm, inputs = build(kind, torch.float64)
    args = tuple(a.double() if a.is_floating_point() else a for a in inputs(4))
    lora = random_lora(fm, 4, dtype=torch.float64)
    with fm.mounted(lora):
        batched = base(*args)
    for i in range(4):
        fm.merge(lora[i])
        alone = base(*(a[i:i + 1] for a in args))
        fm.unmerge()
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(batched[0], batched[1])


@pytest.mark.parametrize("kind", list(CASES))
def test_float32_per_sample_matches_reference(kind):
    base, fm, inputs = build(kind)
    args = inputs(3)
    lora = random_lora(fm, 3)
    with fm.mounted(lora):
        batched = base(*args)
    for i in range(3):
        fm.merge(lora[i])
        torch.testing.assert_close(batched[i:i + 1], base(*(a[i:i + 1] for a in args)), rtol=1e-5, atol=1e-5)
        fm.unmerge()


@pytest.mark.parametrize("kind", list(CASES))
def test_cfg_tiling_and_broadcast(kind):
    """A LoRA batch n dividing the input batch: sample i uses LoRA i % n (as torch.cat([x, x]))."""
    base, fm, inputs = build(kind)
    args = inputs(2)
    lora = random_lora(fm, 2)
    with fm.mounted(lora):
        pair = base(*args)
        doubled = base(*(torch.cat([a, a]) for a in args))
    torch.testing.assert_close(doubled, torch.cat([pair, pair]), rtol=1e-5, atol=1e-5)
    with fm.mounted(lora[1]):  # batch 1 broadcasts
        broadcast = base(*args)
    torch.testing.assert_close(broadcast[1], pair[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="LoRA batch 2 does not divide the input batch 3"):
        with fm.mounted(lora):
            base(*inputs(3))


def test_outside_mounted_the_base_is_the_base():
    torch.manual_seed(0)
    base = TinyTransformer()
    original = copy.deepcopy(base)
    x = torch.randn(2, 5, 16)
    fm = funcmem.FunctionalMemory(base, ["qkv", "fc1"], rank=2, condition_dim=4)
    with fm.mounted(random_lora(fm, 2)):
        assert not torch.equal(base(x), original(x))
    assert torch.equal(base(x), original(x))
    with pytest.raises(RuntimeError, match="already mounted"):
        with fm.mounted(random_lora(fm, 2)), fm.mounted(random_lora(fm, 2)):
            pass


@pytest.mark.parametrize("kind", list(CASES))
def test_unmerge_restores_bit_for_bit(kind):
    base, fm, _ = build(kind)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fm.merge(random_lora(fm, 1, std=1.0))
    assert any(not torch.equal(before[k], v) for k, v in base.state_dict().items())
    fm.unmerge()
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="batch 1"):
        fm.merge(random_lora(fm, 2))


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradcheck_through_per_sample_path(kind):
    """Gradients reach the factors through the per-sample path (float64 gradcheck)."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = torch.nn.Linear(3, 2).double(), torch.randn(2, 2, 3, dtype=torch.float64)
    else:
        base, x = torch.nn.Conv2d(2, 2, 3, padding=1).double(), torch.randn(2, 2, 4, 4, dtype=torch.float64)
    shared = funcmem.SharedLoRA(torch.nn.Sequential(base), ["0"], rank=2)
    wrapper = shared.base[0]
    t = shared.targets[0]
    a = torch.randn(2, *t.a_shape(2), dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, *t.b_shape(2), dtype=torch.float64, requires_grad=True)

    def f(a, b, x):
        with shared.mounted(LoRA({t.name: (a, b)}, 0.5)):
            return wrapper(x)

    assert torch.autograd.gradcheck(f, (a, b, x.requires_grad_()))


def test_wrapped_base_saves_and_loads_under_its_own_names():
    torch.manual_seed(0)
    base = TinyTransformer()
    names = list(base.state_dict())
    funcmem.FunctionalMemory(base, ["qkv", "fc1"], rank=2, condition_dim=4)  # wraps the targets
    assert list(base.state_dict()) == names
    fresh = TinyTransformer()
    fresh.load_state_dict(base.state_dict())  # a plain base reads a wrapped base's weights
    base.load_state_dict(TinyTransformer().state_dict())  # and a wrapped base reads plain ones
    x = torch.randn(2, 5, 16)
    assert not torch.equal(base(x), fresh(x))
    base.load_state_dict(fresh.state_dict())
    assert torch.equal(base(x), fresh(x))
