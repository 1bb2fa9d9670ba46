"""Functional distillation (core): the update distance equals the dense one and ignores the
factorisation; the store keeps condition vectors, not data; forgetting trains on the store alone."""

import pytest
import torch

from funcmem.distill import ConditionStore, FunctionalDistillation, forget, product_sq_distance
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
    assert {"keep", "zero"} <= set(history[-1])
    assert all(s[-1] == 8 for s in fm.calls)  # only stored condition vectors went in
    with pytest.raises(ValueError, match="no condition labelled 7"):
        forget(fm, store, 7, TrainConfig(steps=1))
