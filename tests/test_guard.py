"""Guards: conditions are checked at the boundary; generated updates are bounded and non-finite
ones refused (at inference) or skipped (in training)."""

import math

import pytest
import torch

import funcmem
from funcmem.guard import LoRAGuard, NonFiniteLoRAError, check_condition, update_norms
from funcmem.lora import LoRA
from funcmem.train import Trainer, TrainConfig
from funcmem.targets import Target
from helpers import TinyTransformer, random_lora, randomize_b_head

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


TARGETS = [Target("lin", "linear", 7, 5), Target("exp", "experts", 6, 3, 2)]  # rank 4


def guard_lora() -> LoRA:
    """Three samples' factors for a linear and a 2-expert target."""
    return random_lora(TARGETS, 3, rank=4, scale=0.5, std=1.0, seed=0)


# ---------------------------------------------------------------- update norms and clipping


def test_update_norm_matches_the_dense_product():
    lora = guard_lora()
    norms = update_norms(lora)
    for name, (a, b) in lora.factors.items():
        dense = lora.scale * (b @ a)  # (n, [E,] out, in)
        torch.testing.assert_close(norms[name], dense.flatten(1).norm(dim=1))


def test_guard_clips_over_bound_updates_to_the_bound_and_counts():
    lora = guard_lora()
    norms = update_norms(lora)
    bound = float(norms["lin"].median())  # one sample under, one at, one over
    guard = LoRAGuard(max_update_norm=bound, max_relative_norm=None)
    out = guard(lora)
    after = update_norms(out)
    expected = {k: v.clamp(max=bound) for k, v in norms.items()}
    for k in after:
        torch.testing.assert_close(after[k], expected[k])
    assert guard.clipped == int((norms["lin"] > bound).sum() + (norms["exp"] > bound).sum())
    assert guard.checked == 3 and guard.nonfinite == 0
    under = int(norms["lin"].argmin())
    assert torch.equal(out.factors["lin"][1][under], lora.factors["lin"][1][under])  # untouched, bit for bit
    assert all(torch.equal(out.factors[k][0], lora.factors[k][0]) for k in lora.factors)  # A never changes


def test_relative_bound_uses_the_weight_norm():
    lora = guard_lora()
    norms = update_norms(lora)
    guard = LoRAGuard(max_relative_norm=2.0)
    weights = {"lin": float(norms["lin"].max()) / 4, "exp": 1e6}
    out = guard(lora, weights)
    assert float(update_norms(out)["lin"].max()) == pytest.approx(2.0 * weights["lin"], rel=1e-5)
    assert torch.equal(out.factors["exp"][1], lora.factors["exp"][1])


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_factors_fail_the_request(bad):
    lora = guard_lora()
    lora.factors["exp"][1][2, 1, 0, 0] = bad
    guard = LoRAGuard()
    with pytest.raises(NonFiniteLoRAError, match=r"samples \[2\] of 3, at targets \['exp'\]"):
        guard(lora)
    assert guard.nonfinite == 1


def fm_with_b_head(std):
    torch.manual_seed(0)
    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv", "fc1"], rank=4, alpha=8, condition_dim=12, generator=GEN)
    randomize_b_head(fm, std)
    return fm


def test_default_guard_leaves_a_sane_generator_alone():
    fm = fm_with_b_head(0.3)  # random B head, bigger than test_memory's: updates ~30x the weight norm
    c = torch.randn(4, 3, 12)
    guarded = fm.generate(c)
    assert fm.guard.counters() == {"checked": 4, "clipped": 0, "nonfinite": 0}
    fm.guard = None  # off
    plain = fm.generate(c).detach()
    assert all(torch.equal(guarded.factors[k][1], plain.factors[k][1]) for k in plain.factors)
    norms, weights = update_norms(plain), fm._weight_norms()
    assert 10 < max(float(norms[k].max()) / weights[k] for k in norms) < 50  # under the default bound, 100x


def test_generate_bounds_a_blown_up_generator_and_refuses_nan():
    fm = fm_with_b_head(20.0)  # updates ~2000x the weight norm
    c, x = torch.randn(2, 3, 12), torch.randn(2, 5, 16)
    lora = fm.generate(c)
    weights = fm._weight_norms()
    assert fm.guard.clipped > 0
    for name, norm in update_norms(lora.detach()).items():
        assert float(norm.max()) == pytest.approx(100.0 * weights[name], rel=1e-4)
    assert torch.isfinite(fm(c, x)).all()
    with torch.no_grad():
        fm.generator.model.proj_out_B.bias[0] = math.nan
    with pytest.raises(NonFiniteLoRAError):
        fm.generate(c)
    assert fm.guard.nonfinite == 1


# ---------------------------------------------------------------- conditions at the boundary


@pytest.mark.parametrize("condition, error, message", [
    (torch.randn(2, 3, 5), ValueError, r"width must be 12.*\(B, L, 12\).*got shape \(2, 3, 5\)"),
    (torch.randn(2, 3, 4, 12), ValueError, r"\(B, L, 12\) or \(B, 12\), got 4-D shape \(2, 3, 4, 12\)"),
    (torch.randn(12), ValueError, r"got 1-D shape \(12,\)"),
    (torch.ones(2, 3, 12, dtype=torch.long), TypeError, r"floating tensor.*torch.int64 of shape \(2, 3, 12\)"),
    ([[0.0] * 12], TypeError, "must be a tensor.*got list"),
    (torch.randn(0, 3, 12), ValueError, "at least one sample"),
    (torch.randn(2, 0, 12), ValueError, "at least one sample and one token"),
    (torch.randn(2, 3, 12, device="meta"), ValueError, "condition is on meta but the generator is on cpu"),
])
def test_bad_conditions_are_refused_naming_expected_and_actual(condition, error, message):
    fm = fm_with_b_head(0.1)
    with pytest.raises(error, match=message):
        fm.generate(condition)


def test_non_finite_conditions_name_the_samples():
    c = torch.randn(3, 2, 12)
    c[1, 0, 0], c[2, 1, 3] = math.nan, math.inf
    with pytest.raises(ValueError, match=r"1 NaN and 1 Inf values, in samples \[1, 2\] of 3"):
        fm_with_b_head(0.1).generate(c)


def test_other_float_dtypes_and_layouts_are_accepted():
    fm = fm_with_b_head(0.1)
    c = torch.randn(2, 3, 12)
    ref = fm.generate(c).factors["blocks.0.attn.qkv"][1]
    for variant in (c.double(), c[:, None]):
        torch.testing.assert_close(fm.generate(variant).factors["blocks.0.attn.qkv"][1], ref)
    assert check_condition(torch.randn(2, 12), 12).shape == (2, 1, 12)


# ---------------------------------------------------------------- training skips non-finite steps


def test_trainer_skips_non_finite_steps_and_counts_them():
    fm = fm_with_b_head(0.1)
    data = [(torch.randn(2, 3, 12), torch.randn(2, 5, 16)) for _ in range(8)]
    snapshots = {}

    def loss_fn(m, batch):
        c, x = batch
        step = trainer.step
        snapshots[step] = {k: v.clone() for k, v in m.generator.state_dict().items()}
        if step == 2:
            return m(c, x).sum() * math.nan  # a NaN loss
        if step == 4:
            with torch.no_grad():
                m.generator.model.proj_out_A.bias[0] = math.inf  # generated factors become non-finite
            try:
                return m(c, x).pow(2).mean()
            finally:
                with torch.no_grad():
                    m.generator.model.proj_out_A.bias[0] = 0.0
        return m(c, x).pow(2).mean()

    trainer = Trainer(fm, loss_fn, TrainConfig(steps=7, lr=1e-2, warmup_steps=1, log_every=1, progress=False))
    with pytest.warns(UserWarning, match="skipping step"):
        history = trainer.fit(lambda s: data[s])
    assert trainer.step == 7 and trainer.skipped == 2
    assert [r["skipped_steps"] for r in history] == [0, 0, 1, 1, 2, 2, 2]
    assert math.isnan(history[2]["loss"]) and history[4]["grad_norm"] != history[4]["grad_norm"]
    for skipped in (2, 4):  # the weights did not move on a skipped step
        after = snapshots[skipped + 1]
        assert all(torch.equal(after[k], v) for k, v in snapshots[skipped].items() if "proj_out_A.bias" not in k)
    assert all(math.isfinite(v) for r in history if r["skipped_steps"] == 0 for v in (r["loss"], r["grad_norm"]))


def test_too_many_non_finite_steps_raise():
    fm = fm_with_b_head(0.1)
    trainer = Trainer(fm, lambda m, b: m(*b).sum() * math.nan,
                      TrainConfig(steps=5, warmup_steps=1, max_skipped_steps=1, progress=False))
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match="2 non-finite steps.*max_skipped_steps=1"):
        trainer.fit(lambda s: (torch.randn(2, 3, 12), torch.randn(2, 5, 16)))
