"""The manifold analyses on generated updates, with a fake memory whose updates are known: a value
the update follows gives |Spearman| 1, a value it ignores gives little; clusters by edit are seen
through the updates even when the factors are rotated."""

import torch

from funcmem.editing.benchmark.analysis import manifold, value_spearman
from funcmem.editing.tasks import Instance
from funcmem.lora import LoRA

EDITS = ["brighten", "darken"]


class FakeSet:
    """Samples with an edit id, an instance (edit, value) and a noise seed; ``chunks`` yields batches."""

    def __init__(self, edit_ids: list[int], values: list[float]):
        self.edit_ids = torch.tensor(edit_ids)
        self.instances = [Instance((EDITS[e],), (v,), ("train",), "") for e, v in zip(edit_ids, values)]

    def chunks(self, condition: str, size: int = 4):
        for start in range(0, len(self.edit_ids), size):
            yield {"rows": torch.arange(start, min(start + size, len(self.edit_ids))), "set": self}


class FakeMemory:
    """Update of sample i: direction of its edit * (value if ``follow`` else 1) + small noise, written
    through factors rotated by a random matrix per sample (the update stays the same)."""

    def __init__(self, follow: bool, noise: float = 0.05):
        g = torch.Generator().manual_seed(0)
        self.directions = [(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)) for _ in EDITS]
        self.follow, self.noise = follow, noise

    def lora(self, batch: dict) -> LoRA:
        data, a_rows, b_rows = batch["set"], [], []
        for i in batch["rows"].tolist():
            g = torch.Generator().manual_seed(100 + i)
            a, b = self.directions[int(data.edit_ids[i])]
            size = data.instances[i].values[0] if self.follow else 1.0
            a = a * size + self.noise * torch.randn(a.shape, generator=g)
            r = torch.randn(2, 2, generator=g) + 3 * torch.eye(2)
            a_rows.append(torch.linalg.inv(r) @ a)
            b_rows.append(b @ r)
        return LoRA({"t": (torch.stack(a_rows), torch.stack(b_rows))}, 1.0)


def test_value_spearman_follows_the_value_only_when_the_update_does():
    g = torch.Generator().manual_seed(1)
    values = (0.2 + 2 * torch.rand(24, generator=g)).tolist()
    data = FakeSet([i % 2 for i in range(24)], values)
    follows = value_spearman(FakeMemory(follow=True), [data], "c", min_samples=8)
    assert set(follows["per_edit"]) == set(EDITS) and follows["samples"] == {"brighten": 12, "darken": 12}
    assert follows["mean"] > 0.95
    ignores = value_spearman(FakeMemory(follow=False), [data], "c", min_samples=8)
    assert ignores["mean"] < 0.7
    too_few = value_spearman(FakeMemory(follow=True), [data], "c", min_samples=13)
    assert too_few == {"per_edit": {}, "samples": {}, "mean": None}


def test_manifold_clusters_on_updates_whatever_the_factors():
    data = FakeSet([i % 2 for i in range(24)], [1.0] * 24)
    result, points = manifold(FakeMemory(follow=False), data, "c", EDITS)
    assert result["on"] == "updates" and result["silhouette"] > 0.9  # the factors alone are rotated per sample
    assert points["pca"].shape == (24, 2) and 0 < result["pca_explained_2d"] <= 1 + 1e-6
    assert result["mean_pair_distance"] > 0
