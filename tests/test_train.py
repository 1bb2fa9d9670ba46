"""Training: only the generator moves, resume is exact, and the generator beats a shared LoRA
on a conflicting problem even when the shared LoRA has more parameters."""

import pytest
import torch

import funcmem
from funcmem.toy import ConflictingTasks, ToyMLP
from funcmem.train import Trainer, TrainConfig

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=16, token_dim=32)


def fm_loss(fm, batch):
    cond, x, y, _ = batch
    return ((fm(cond, x) - y) ** 2).mean()


def shared_loss(shared, batch):
    _, x, y, _ = batch
    return ((shared(x) - y) ** 2).mean()


def make(seed=0):
    torch.manual_seed(seed)
    base = ToyMLP(32)
    tasks = ConflictingTasks(base)
    return base, tasks


def test_only_the_generator_moves():
    base, tasks = make()
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16, generator=GEN)
    before_base = {k: v.clone() for k, v in base.state_dict().items()}
    before_gen = {k: v.clone() for k, v in fm.generator.state_dict().items()}
    Trainer(fm, fm_loss, TrainConfig(steps=5, lr=1e-2, warmup_steps=1, progress=False)).fit(tasks.batch)
    assert all(torch.equal(before_base[k], v) for k, v in base.state_dict().items())
    moved = [k for k, v in fm.generator.state_dict().items() if not torch.equal(before_gen[k], v)]
    assert len(moved) == len(before_gen)


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    cfg = dict(steps=30, lr=3e-3, warmup_steps=5, checkpoint_every=10, log_every=5, progress=False)

    def run(out, crash_at=None, resume=False):
        base, tasks = make()
        fm = funcmem.FunctionalMemory(base, ["fc1"], rank=4, condition_dim=16, generator=GEN)

        def loss(m, batch):
            if crash_at is not None and trainer.step == crash_at:
                raise KeyboardInterrupt("simulated kill")
            return fm_loss(m, batch)

        trainer = Trainer(fm, loss, TrainConfig(out_dir=str(out), **cfg))
        trainer.fit(tasks.batch, resume=resume)
        return trainer, fm

    straight, fm_a = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", crash_at=17)
    resumed, fm_b = run(tmp_path / "b", resume=True)
    assert resumed.step == straight.step == 30
    assert [r["step"] for r in resumed.history] == [r["step"] for r in straight.history]
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-4)
    for (k, v), w in zip(fm_a.generator.state_dict().items(), fm_b.generator.state_dict().values()):
        torch.testing.assert_close(v, w, msg=k)


def test_checkpoint_from_other_parameters_is_refused(tmp_path):
    base, tasks = make()
    fm = funcmem.FunctionalMemory(base, ["fc1"], rank=4, condition_dim=16, generator=GEN)
    Trainer(fm, fm_loss, TrainConfig(steps=2, out_dir=str(tmp_path), progress=False)).fit(tasks.batch)
    shared = funcmem.SharedLoRA(ToyMLP(32), ["fc1"], rank=4)
    with pytest.raises(ValueError, match="other parameters"):
        Trainer(shared, shared_loss, TrainConfig(steps=4, out_dir=str(tmp_path), progress=False)).fit(
            tasks.batch, resume=True)


@pytest.mark.slow
def test_generator_beats_a_larger_shared_lora_on_conflicting_tasks():
    base, tasks = make()
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16, generator=GEN)
    shared = funcmem.SharedLoRA(base, ["fc1", "fc2"], rank=64)
    assert shared.num_trainable_parameters() > fm.num_trainable_parameters()
    cfg = dict(steps=300, warmup_steps=20, progress=False)
    Trainer(fm, fm_loss, TrainConfig(lr=3e-3, **cfg)).fit(tasks.batch)
    Trainer(shared, shared_loss, TrainConfig(lr=1e-2, **cfg)).fit(tasks.batch)
    test = [tasks.batch(10**6 + i, 256) for i in range(2)]
    with torch.no_grad():
        fm_eval = sum(fm_loss(fm, b).item() for b in test) / 2
        shared_eval = sum(shared_loss(shared, b).item() for b in test) / 2
        base_eval = sum(((base(b[1]) - b[2]) ** 2).mean().item() for b in test) / 2
    print(f"toy: generator {fm_eval:.4f} ({fm.num_trainable_parameters()} params), "
          f"shared LoRA {shared_eval:.4f} ({shared.num_trainable_parameters()} params), base {base_eval:.4f}")
    assert fm_eval < 0.3 * shared_eval
    assert shared_eval > 0.7 * base_eval  # the shared LoRA can only find the compromise


def test_routing_margin_is_logged_and_grows_on_conflicting_tasks(tmp_path):
    """metrics.jsonl carries routing_margin = shuffled-condition loss - true loss; a generator that
    learned the opposite tasks loses a lot when given another sample's condition."""
    import json

    base, tasks = make()
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16, generator=GEN)
    Trainer(fm, fm_loss, TrainConfig(steps=150, lr=3e-3, warmup_steps=10, log_every=50, out_dir=str(tmp_path),
                                     progress=False)).fit(tasks.batch)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 150]
    assert rows[-1]["routing_margin"] > rows[-1]["loss"]  # the wrong condition more than doubles the loss
    with torch.no_grad():  # and it is what the name says, measured by hand on a batch
        batch = tasks.batch(7)
        with fm.shuffled_conditions():
            shuffled = fm_loss(fm, batch)
        rolled = (batch[0].roll(1, 0), *batch[1:])
        assert torch.equal(shuffled, fm_loss(fm, rolled))


def test_a_collapsed_generator_is_flagged():
    """A generator whose condition cannot reach it (input projection frozen at zero) has a zero
    margin; after warm-up the trainer warns."""
    from funcmem.train import CollapseWarning

    base, tasks = make()
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16, generator=GEN)
    torch.nn.init.zeros_(fm.generator.hidden_in.weight)
    fm.generator.hidden_in.weight.requires_grad_(False)
    trainer = Trainer(fm, fm_loss, TrainConfig(steps=40, lr=3e-3, warmup_steps=5, log_every=5, progress=False))
    with pytest.warns(CollapseWarning, match="barely depends on its condition"):
        history = trainer.fit(tasks.batch)
    assert all(abs(r["routing_margin"]) < 1e-6 for r in history)
    shared = funcmem.SharedLoRA(ToyMLP(32), ["fc1"], rank=2)  # nothing to shuffle: no margin, no warning
    history = Trainer(shared, shared_loss, TrainConfig(steps=4, warmup_steps=1, log_every=2, progress=False)).fit(
        tasks.batch)
    assert all("routing_margin" not in r for r in history)
