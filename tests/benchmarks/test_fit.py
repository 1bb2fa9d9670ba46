"""``funcmem bench fit``: tiny shapes, the command runs and its numbers are consistent."""

import json

import pytest

from funcmem.benchmarks.fit import FitConfig, FitTasks, run
from funcmem.toy import ToyMLP


def tiny(**overrides):
    return FitConfig(**{**dict(tasks=4, dim=16, depth=2, train_per_task=32, test_per_task=32, steps=30, batch=16,
                               seeds=[0], generator=dict(d_model=32, depth=1, head_dim=8, token_dim=16,
                                                         dim_accumulation=2)), **overrides})


def test_tasks_come_in_opposite_pairs_and_the_oracle_sits_on_the_floor():
    import torch

    cfg = tiny()
    tasks = FitTasks(cfg, ToyMLP(cfg.dim, cfg.depth), seed=0)
    lora = tasks.teacher.lora()
    a, b = next(iter(lora.factors.values()))
    assert torch.equal(a[0], a[1]) and torch.equal(b[0], -b[1])  # task 1 undoes task 0
    assert tasks.floor == pytest.approx(cfg.noise * tasks.base_loss)


def test_fit_command_writes_losses_ratios_and_parameters(tmp_path, one_thread):
    from funcmem.cli import main

    out = tmp_path / "fit.json"
    assert main(["bench", "fit", "--quick", "--steps", "30", "--out", str(out), "--no-warm-start", "--generator",
                 '{"d_model": 32, "depth": 1, "head_dim": 8, "token_dim": 16, "dim_accumulation": 2}']) == 0
    result = json.loads(out.read_text())
    m = result["models"]
    assert set(m) == {"base", "oracle", "bank", "generator"}
    assert m["oracle"]["test_excess"] == 0 and m["oracle"]["train_excess"] == 0
    assert abs(m["oracle"]["test_loss"] - result["floor"]) < 0.2 * result["floor"]  # noise of the floor's estimate
    assert m["bank"]["test_excess"] < m["base"]["test_excess"]  # 30 steps already move the bank
    r = result["ratios"]["generator"]
    assert r["train_loss"] == pytest.approx(m["generator"]["train_loss"] / m["bank"]["train_loss"])
    b = result["budget"]
    assert b["within_budget"] == (b["generator_params"] <= b["bank_params"] + b["trunk_params"])
    assert m["bank"]["params"] == 12 * 4 * (64 + 256 + 256 + 64) * 4  # K tasks x layers x r (in + out) x 2 slots


def test_warm_start_row(one_thread):
    result = run(tiny(warm_start=True, generator=dict(d_model=32, depth=1, head_dim=8, token_dim=16,
                                                      dim_accumulation=2, basis=4)))
    warm = result["models"]["generator_warm_start"]
    assert warm["test_excess"] < result["models"]["base"]["test_excess"]
    assert "generator_warm_start" in result["ratios"]
