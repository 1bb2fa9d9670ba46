"""The generator: HY-WU's function, identity at step 0, gradients everywhere, options."""

import warnings

import pytest
import torch

import funcmem
from funcmem.generator import FORMAT_DESIGN, GeneratorConfig, HeadBottleneckWarning, ParameterGenerator
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


# ---------------------------------------------------------------- design options (funcmem's own)


def test_head_bottleneck_is_flagged_when_rows_are_narrower_than_tokens():
    narrow = GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=4)  # d = 8 < 16
    wide = GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2)  # d = 16
    assert narrow.head_bottleneck and not wide.head_bottleneck
    with pytest.warns(HeadBottleneckWarning, match=r"9-dimensional affine subspace; choose token_dim <= 8"):
        make_fm(narrow)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_fm(wide)


def test_a_design_chosen_knowingly_gets_no_advice():
    narrow = GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        funcmem.FunctionalMemory(TinyTransformer(), ["qkv", "fc1", "fc2"], rank=4, condition_dim=12, generator=narrow,
                                 advise=False)


def test_saved_narrow_generator_loads_without_the_warning(tmp_path):
    with pytest.warns(HeadBottleneckWarning):
        _, fm = make_fm(GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=4))
    fm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())


def test_configs_written_before_the_design_options_load_as_the_format():
    old = {"d_model": 32, "depth": 2, "head_dim": 8, "token_dim": 16, "dim_accumulation": 2, "mlp_ratio": 4,
           "rope_theta": 10000.0, "checkpointing": False, "attention": "factorized"}
    cfg = GeneratorConfig.from_dict(old)
    assert {k: getattr(cfg, k) for k in FORMAT_DESIGN} == FORMAT_DESIGN


DESIGNS = [dict(), dict(head="slot"), dict(head="layer_slot"), dict(basis=3), dict(modulation=True),
           dict(factor_init="lora")]


@pytest.mark.parametrize("design", DESIGNS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "format")
def test_padded_and_unpadded_conditions_give_the_same_lora(design):
    """Key padding: a condition padded at the end with a mask is the unpadded condition."""
    _, fm = make_fm(GeneratorConfig(**{**CFG.to_dict(), **design}))
    with torch.no_grad():
        for p in fm.generator.parameters():  # zero-initialised parts (B heads, basis, modulation) too
            p.add_(0.05 * torch.randn_like(p))
    short, long = torch.randn(1, 3, 12), torch.randn(1, 5, 12)
    padded = torch.cat([torch.cat([short, 7 * torch.randn(1, 2, 12)], 1), long])  # junk in the padding
    mask = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    with torch.no_grad():
        got = fm.generate(padded, mask).flatten()
        want = torch.cat([fm.generate(short).flatten(), fm.generate(long).flatten()])
        unmasked = fm.generate(padded).flatten()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (unmasked[0] - want[0]).abs().max() > 1e-3  # without the mask the padding is read
    with pytest.raises(ValueError, match="without any real condition token"):
        fm.generate(padded, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 5\)"):
        fm.generate(padded, mask[:, :4])


@pytest.mark.parametrize("design", DESIGNS[1:], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_design_starts_at_the_base_and_trains_every_weight(design):
    base, fm = make_fm(GeneratorConfig(**{**CFG.to_dict(), **design}))
    x, c, target = torch.randn(3, 5, 16), torch.randn(3, 7, 12), torch.randn(3, 5, 16)
    with torch.no_grad():
        assert torch.equal(fm(c, x), base(x))
    opt = torch.optim.Adam(fm.generator.parameters(), lr=1e-2)
    for _ in range(3):  # zero-initialised parts get gradient once what multiplies them has moved
        opt.zero_grad()
        ((fm(c, x) - target) ** 2).mean().backward()
        opt.step()
    no_grad = [n for n, p in fm.generator.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_lora_factor_init_matches_a_lora_a_scale():
    """factor_init="lora": generated A entries have the std of a Kaiming-uniform A (1/sqrt(3 fan_in))."""
    cfg = GeneratorConfig(d_model=64, depth=1, head_dim=16, token_dim=16, dim_accumulation=1, head="slot",
                          factor_init="lora")
    _, fm = make_fm(cfg)
    with torch.no_grad():
        lora = fm.generate(torch.randn(8, 4, 12))
    for t in fm.targets:
        a = lora.factors[t.name][0]
        want = 1 / (3 * t.in_features) ** 0.5
        assert 0.6 * want < a.std().item() < 1.6 * want, (t.name, a.std().item(), want)
    _, hywu_init = make_fm(GeneratorConfig(**{**cfg.to_dict(), "factor_init": "hywu"}))
    with torch.no_grad():
        a = hywu_init.generate(torch.randn(8, 4, 12)).factors[fm.targets[0].name][0]
    assert a.std().item() > 3 / (3 * fm.targets[0].in_features) ** 0.5  # the format's init: several times larger


def test_trunk_parameters_are_the_format_generator_of_the_same_size():
    _, plain = make_fm()
    _, slot = make_fm(GeneratorConfig(**{**CFG.to_dict(), "head": "slot", "basis": 2, "modulation": True}))
    assert plain.generator.count_trunk_parameters() == plain.generator.count_parameters()
    assert slot.generator.count_trunk_parameters() == plain.generator.count_parameters()
    assert slot.generator.count_parameters() > plain.generator.count_parameters()


def test_rope_tables_give_the_pairwise_rotation():
    from funcmem.blocks import apply_rope, rope_angles, rope_tables

    angles = rope_angles(torch.stack([torch.arange(6), torch.arange(6) * 2], 1), [4, 4], 10000.0)  # (6, 4)
    x = torch.randn(2, 3, 6, 8)
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = angles.cos(), angles.sin()
    want = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)
    assert torch.equal(apply_rope(x, rope_tables(angles)), want)


def test_repeated_conditions_are_generated_once_with_the_same_result_and_gradients():
    """A batch of labels repeats conditions: each distinct one is generated once. Values and the
    generator's gradients are those of generating every row; the gradient of a condition goes to
    its first occurrence (summed over its repeats: the same for whatever computed them alike)."""
    _, fm = make_fm()
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=0.1)
    c = torch.randn(3, 2, 12)
    order = torch.tensor([0, 1, 0, 2, 1, 0])
    source = c.clone().requires_grad_()
    calls = []
    hook = fm.generator.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    lora = fm.generate(source[order])
    hook.remove()
    assert calls == [3] and lora.batch_size == 6  # three distinct conditions generated, six rows back
    lora.flatten().square().sum().backward()
    grads = {n: p.grad.clone() for n, p in fm.generator.named_parameters()}
    fm.generator.zero_grad()
    plain = c.clone().requires_grad_()
    rows = torch.cat([fm.generate(plain[order][i:i + 1]).flatten() for i in range(6)])
    torch.testing.assert_close(lora.flatten().detach(), rows.detach(), atol=1e-6, rtol=1e-5)
    rows.square().sum().backward()
    for n, p in fm.generator.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(source.grad, plain.grad, atol=1e-5, rtol=1e-4)


def test_training_after_inference_mode_generation():
    """Cached rope tables made under inference_mode (the service) are not reused by a training step."""
    _, fm = make_fm()
    cond = torch.randn(2, 3, fm.condition_dim)
    with torch.inference_mode():
        served = fm.generate(cond).flatten()
    fm.generate(cond).flatten().pow(2).sum().backward()  # raised "Inference tensors cannot be saved for backward" before
    torch.testing.assert_close(fm.generate(cond).flatten().detach(), served)
