"""Functional distillation (core): the update distance equals the dense one and ignores the
factorisation; the store keeps condition vectors, not data; forgetting trains on the store alone."""

import pytest
import torch

from funcmem.distill import (ConditionStore, FunctionalDistillation, Neighbourhood, forget, generate_all, product_sq_distance,
                             relearn, retarget, scaled)
from funcmem.lora import LoRA
from funcmem.targets import Target
from funcmem.train import TrainConfig
from helpers import random_lora

TARGETS = [Target("t0", "linear", 7, 5), Target("t1", "linear", 6, 4)]


def two_target_lora(seed: int) -> LoRA:
    return random_lora(TARGETS, 3, rank=2, scale=1.5, std=1.0, seed=seed)


def test_product_distance_equals_the_dense_update_difference():
    new, old = two_target_lora(0), two_target_lora(1)
    dense = lambda l: {k: l.scale * b @ a for k, (a, b) in l.factors.items()}
    dn, do = dense(new), dense(old)
    expected = sum((dn[k] - do[k]).pow(2).flatten(1).sum(1) for k in dn)
    assert torch.allclose(product_sq_distance(new, old), expected, rtol=1e-4)
    assert torch.allclose(product_sq_distance(new), sum(dn[k].pow(2).flatten(1).sum(1) for k in dn), rtol=1e-4)


def test_product_distance_ignores_the_factorisation():
    lora = two_target_lora(0)
    q = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    twisted = LoRA({k: (torch.linalg.inv(q) @ a, b @ q) for k, (a, b) in lora.factors.items()}, lora.scale)
    assert product_sq_distance(twisted, lora).max() < 1e-6 * product_sq_distance(lora).max()


def test_store_holds_condition_vectors_and_counts_its_bytes():
    store = ConditionStore()
    store.add(torch.randn(4, 10, 8), torch.tensor([0, 0, 3, 3]))
    store.add(torch.randn(2, 10, 8), torch.tensor([5, 5]))
    assert len(store) == 6 and set(store.tensors()) == {"conditions", "labels"}
    assert store.conditions.dtype == torch.float16 and store.conditions.shape == (6, 10, 8)
    assert store.nbytes == 6 * 10 * 8 * 2 + 6
    with pytest.raises(ValueError, match="labels must lie in"):
        store.add(torch.randn(1, 10, 8), torch.tensor([300]))


class TinyGenerator(torch.nn.Module):
    """A generator's interface (``generate``, ``generator``): (n, L, 8) -> a rank-1 LoRA on one 3 x 2 target."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.generator = torch.nn.Linear(8, 6)
        self.calls = []

    def generate(self, c):
        self.calls.append(c.shape)
        h = self.generator(c.mean(1))  # (n, 6)
        return LoRA({"t": (h[:, None, :2], h[:, 2:5, None])}, 1.0)


def stored(n_per_label: int = 2) -> ConditionStore:
    store = ConditionStore()
    store.add(torch.randn(2 * n_per_label, 5, 8, generator=torch.Generator().manual_seed(1)),
              torch.tensor([0] * n_per_label + [1] * n_per_label))
    return store


def test_distillation_is_zero_for_the_generator_it_recorded_and_grows_as_it_moves():
    fm, store = TinyGenerator(), stored()
    keep = FunctionalDistillation(fm, store, batch=4, seed=0)
    assert keep(fm).item() < 1e-6
    with torch.no_grad():
        fm.generator.weight.add_(0.5)
    assert keep(fm).item() > 1e-2


def test_forgetting_drives_one_label_to_zero_from_the_store_only():
    fm, store = TinyGenerator(), stored()
    removed, kept = store.conditions[:2].float(), store.conditions[2:].float()
    before_removed = product_sq_distance(fm.generate(removed)).mean().item()
    kept_before = fm.generate(kept).detach()
    history = forget(fm, store, 0, TrainConfig(steps=30, lr=3e-2, progress=False), batch=2, seed=0)
    assert product_sq_distance(fm.generate(removed)).mean().item() < 0.2 * before_removed
    assert product_sq_distance(fm.generate(kept), kept_before).mean() < product_sq_distance(kept_before).mean()
    assert {"keep", "move"} <= set(history[-1])
    assert all(s[-1] == 8 for s in fm.calls)  # only stored condition vectors went in
    with pytest.raises(ValueError, match=r"no condition labelled \[7\]"):
        forget(fm, store, 7, TrainConfig(steps=1))


def test_forgetting_several_labels_at_once():
    fm = TinyGenerator()
    store = ConditionStore()
    store.add(torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 0, 1, 1, 2, 2]))
    c = store.conditions.float()
    before = product_sq_distance(fm.generate(c)).detach()
    forget(fm, store, [0, 2], TrainConfig(steps=40, lr=3e-2, progress=False), batch=2, seed=0)
    after = product_sq_distance(fm.generate(c)).detach()
    assert (after[[0, 1, 4, 5]] < 0.2 * before[[0, 1, 4, 5]]).all()  # both labels, not only the first
    with pytest.raises(ValueError, match=r"no condition labelled \[9\]"):
        forget(fm, store, [0, 9], TrainConfig(steps=1))


def neighbourhood_store() -> tuple[torch.Tensor, torch.Tensor]:
    """Four conditions of L = 3 positions (two label positions, one context), width 2; label 0 or 1."""
    c = torch.arange(24, dtype=torch.float32).reshape(4, 3, 2) + 1
    c[1, 1] = 0  # a padded label position
    return c, torch.tensor([0, 0, 1, 1])


def test_neighbourhood_recombines_label_positions_with_other_stored_context():
    c, labels = neighbourhood_store()
    near = Neighbourhood(torch.tensor([True, True, False]), recombine=True)
    out = near.sample(c, labels, torch.tensor([0, 0, 0, 0, 0, 0, 0, 0]), torch.Generator().manual_seed(0))
    assert torch.equal(out[:, :2], c[0, :2].expand(8, 2, 2))  # the instruction stays
    contexts = {tuple(x.tolist()) for x in out[:, 2]}
    assert contexts <= {tuple(x.tolist()) for x in c[:, 2]} and len(contexts) > 1  # photos from the store


def test_neighbourhood_mix_drop_noise_and_direction_stay_on_label_positions():
    c, labels = neighbourhood_store()
    g = torch.Generator().manual_seed(0)
    pos = torch.tensor([True, True, False])
    mixed = Neighbourhood(pos, mix=1.0).sample(c, labels, torch.tensor([0] * 16), g)
    u = (mixed[:, 0, 0] - c[0, 0, 0]) / (c[1, 0, 0] - c[0, 0, 0])  # towards c[1] (the other label-0 one) or c[0]
    assert ((u >= 0) & (u <= 1)).all() and torch.equal(mixed[:, 2], c[0, 2].expand(16, 2))
    dropped = Neighbourhood(pos, drop=1.0).sample(c, labels, torch.tensor([0, 2]), g)
    assert (dropped[:, :2] == 0).all() and torch.equal(dropped[:, 2], c[[0, 2], 2])
    noisy = Neighbourhood(pos, noise=0.5).sample(c, labels, torch.tensor([1]), g)
    assert (noisy[0, 1] == 0).all() and not torch.equal(noisy[0, 0], c[1, 0]) and torch.equal(noisy[0, 2], c[1, 2])
    shift = c[labels == 1].mean(0) - c.mean(0)  # label 1's direction: +6 on every entry
    moved = Neighbourhood(pos, direction=2.0).sample(c, labels, torch.tensor([2] * 8), g)
    t = (moved[:, :2] - c[2, :2]) / shift[:2]
    assert torch.allclose(t, t[:, :1, :1].expand_as(t)) and ((t >= 0) & (t <= 2)).all() and t.max() > 0


def test_relearn_restores_the_recorded_updates_of_a_removed_label():
    fm, store = TinyGenerator(), stored()
    removed = store.conditions[:2].float()
    recorded = generate_all(fm, store.conditions[:2])
    forget(fm, store, 0, TrainConfig(steps=30, lr=3e-2, progress=False), batch=2, seed=0)
    gap = lambda: product_sq_distance(fm.generate(removed), recorded).mean().item()
    forgotten = gap()
    relearn(fm, store, [0], recorded, TrainConfig(steps=60, lr=3e-2, progress=False), batch=2, seed=0)
    assert gap() < 0.1 * forgotten
    with pytest.raises(ValueError, match="3 recorded updates for 2 stored conditions"):
        relearn(fm, store, [0], LoRA.cat([recorded, recorded[0]]), TrainConfig(steps=1))


def test_forgetting_a_neighbourhood_reaches_recombined_conditions_the_store_never_held():
    torch.manual_seed(0)
    fm, store = TinyGenerator(), stored(4)
    near = Neighbourhood(torch.tensor([True, True, False, False, False]), recombine=True)
    c, labels = store.conditions.float(), store.labels.long()
    unseen = torch.cat([c[:4, :2], c[[5, 6, 7, 4], 2:]], 1)  # label-0 instructions on label-1 context
    before = product_sq_distance(fm.generate(unseen)).mean().item()
    forget(fm, store, 0, TrainConfig(steps=80, lr=3e-2, progress=False), batch=4, seed=0, near=near)
    assert product_sq_distance(fm.generate(unseen)).mean().item() < 0.2 * before
    with pytest.raises(ValueError, match="no known target"):
        retarget(fm, store, labels == 0, TrainConfig(steps=1), generate_all(fm, store.conditions[:4]), near=near)


def test_scaled_multiplies_each_sample_update():
    lora = two_target_lora(0)
    f = torch.tensor([0.0, 0.5, 2.0])
    assert torch.allclose(product_sq_distance(scaled(lora, f)), f ** 2 * product_sq_distance(lora), rtol=1e-5)


def test_a_gate_takes_its_share_of_the_kept_side_update():
    """gate 0 everywhere: the plain removal, step for step; gate 1 everywhere: the kept side goes to zero too;
    a gate on the update's direction: only kept-side draws that act like the removed label lose their update."""
    store, near = stored(4), Neighbourhood(noise=0.5)
    c = store.conditions.float()
    config = TrainConfig(steps=40, lr=3e-2, progress=False)

    def run(gate):
        fm = TinyGenerator()
        forget(fm, store, 0, config, batch=4, seed=0, near=near, gate=gate)
        return fm, product_sq_distance(fm.generate(c)).detach()

    plain, kept_plain = run(None)
    zero, _ = run(lambda lora: torch.zeros(len(lora)))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), zero.state_dict().values()))
    _, everything = run(lambda lora: torch.ones(len(lora)))
    assert (everything[4:] < 0.2 * kept_plain[4:]).all()  # the kept label's stored updates went too
    with pytest.raises(ValueError, match="give a neighbourhood"):
        forget(TinyGenerator(), store, 0, config, gate=lambda lora: torch.ones(len(lora)))
