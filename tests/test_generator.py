"""The generator: HY-WU's function, identity at step 0, gradients everywhere, options."""

import torch

import funcmem
from funcmem.generator import GeneratorConfig, ParameterGenerator
from helpers import TinyTransformer

CFG = GeneratorConfig(d_model=32, depth=2, head_dim=8, token_dim=16, dim_accumulation=2)


def make_fm(cfg=CFG):
    torch.manual_seed(0)
    base = TinyTransformer()
    return base, funcmem.FunctionalMemory(base, ["qkv", "fc1", "fc2"], rank=4, alpha=8, condition_dim=12, generator=cfg)


def test_step_zero_is_the_base():
    base, fm = make_fm()
    x, c = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    with torch.no_grad():
        expected = base(x)
    assert torch.equal(fm(c, x), expected)
    lora = fm.generate(c)
    assert all(a.abs().sum() > 0 and torch.count_nonzero(b) == 0 for a, b in lora.factors.values())


def test_gradients_reach_every_generator_weight():
    """As LoRA's B = 0 init: step 0 trains the B head; from then on every weight gets gradient."""
    base, fm = make_fm()
    x, c = torch.randn(3, 5, 16), torch.randn(3, 7, 12)
    target = torch.randn(3, 5, 16)
    opt = torch.optim.SGD(fm.generator.parameters(), lr=0.1)
    ((fm(c, x) - target) ** 2).mean().backward()
    assert fm.generator.model.proj_out_B.weight.grad.abs().sum() > 0
    opt.step()
    opt.zero_grad()
    ((fm(c, x) - target) ** 2).mean().backward()
    no_grad = [n for n, p in fm.generator.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []
    assert all(p.grad is None for p in base.parameters())


def test_condition_changes_the_lora():
    _, fm = make_fm()
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=0.1)
    c = torch.randn(2, 3, 12)
    l1, l2 = fm.generate(c), fm.generate(c.flip(0))
    assert torch.allclose(l1.flatten()[0], l2.flatten()[1], atol=1e-6)
    assert not torch.allclose(l1.flatten()[0], l1.flatten()[1])


def test_condition_shapes():
    _, fm = make_fm()
    c = torch.randn(2, 12)
    assert fm.generate(c).batch_size == 2 == fm.generate(c[:, None, None]).batch_size
    try:
        fm.generate(torch.randn(2, 3, 11))
    except ValueError as e:
        assert "(B, L, 12)" in str(e) and "11" in str(e)
    else:
        raise AssertionError("wrong condition width accepted")


def test_checkpointing_gives_same_values_and_grads():
    torch.manual_seed(0)
    plain = ParameterGenerator(CFG, 12, num_layers=3, tokens_per_layer=5, a_tokens=2, rank=4)
    ckpt = ParameterGenerator(GeneratorConfig(**{**CFG.to_dict(), "checkpointing": True}), 12, 3, 5, 2, 4)
    ckpt.load_state_dict(plain.state_dict())
    c = torch.randn(2, 3, 12)
    outs = []
    for g in (plain, ckpt):
        out = g(c)
        out.pow(2).sum().backward()
        outs.append((out, g.hidden_in.weight.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_full_attention_variant_has_same_weights_and_shape():
    torch.manual_seed(0)
    fact = ParameterGenerator(CFG, 12, 3, 5, 2, 4)
    full = ParameterGenerator(GeneratorConfig(**{**CFG.to_dict(), "attention": "full"}), 12, 3, 5, 2, 4)
    assert fact.state_dict().keys() == full.state_dict().keys()
    assert full(torch.randn(2, 3, 12)).shape == fact(torch.randn(2, 3, 12)).shape == (2, 3, 5, 4, 16)
