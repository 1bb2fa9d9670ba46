"""Continual learning: the metric definitions on hand-made matrices, the distillation distance, the
condition store (conditions, not images), the protocol's data isolation, and the command end to end
on a tiny run."""

import json
import math

import pytest
import torch

from funcmem.cli import main
from funcmem.editing import continual
from funcmem.editing.editor import Editor
from funcmem.editing.continual import (EDIT_NAMES, ConditionStore, ContinualConfig, product_sq_distance,
                                       summarize)
from funcmem.lora import LoRA

# ------------------------------------------------------------------ metrics


def test_summarize_on_a_hand_made_matrix():
    R = [[30.0, None, None],
         [28.0, 25.0, None],
         [29.0, 22.0, 27.0]]
    s = summarize(R)
    assert s["average"] == pytest.approx((29 + 22 + 27) / 3)
    # best before the end minus final: group A max(30, 28) - 29 = 1; group B 25 - 22 = 3
    assert s["forgetting"] == pytest.approx([1.0, 3.0])
    assert s["mean_forgetting"] == pytest.approx(2.0)
    # final minus just-learnt: A 29 - 30 = -1, B 22 - 25 = -3
    assert s["backward_transfer"] == pytest.approx(-2.0)


def test_summarize_counts_improvement_as_positive_transfer_and_no_forgetting():
    s = summarize([[20.0, None], [23.0, 24.0]])
    assert s["forgetting"] == [-3.0] and s["backward_transfer"] == 3.0 and s["average"] == 23.5
    one = summarize([[21.0]])
    assert one["mean_forgetting"] == 0.0 and one["backward_transfer"] == 0.0 and one["average"] == 21.0


def test_summarize_rejects_missing_or_ragged_entries():
    with pytest.raises(ValueError):
        summarize([[1.0, None], [None, 2.0]])
    with pytest.raises(ValueError):
        summarize([[1.0], [1.0, 2.0]])


# ------------------------------------------------------------------ distillation distance


def _random_lora(n=3, r=2, shapes=((5, 7), (4, 6)), scale=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LoRA({f"t{i}": (torch.randn(n, r, i_, generator=g), torch.randn(n, o, r, generator=g))
                 for i, (o, i_) in enumerate(shapes)}, scale)


def test_product_distance_equals_the_dense_update_difference():
    new, old = _random_lora(seed=0), _random_lora(seed=1)
    dense = lambda l: {k: l.scale * b @ a for k, (a, b) in l.factors.items()}
    dn, do = dense(new), dense(old)
    expected = sum((dn[k] - do[k]).pow(2).flatten(1).sum(1) for k in dn)
    assert torch.allclose(product_sq_distance(new, old), expected, rtol=1e-4)
    assert torch.allclose(product_sq_distance(new), sum(dn[k].pow(2).flatten(1).sum(1) for k in dn), rtol=1e-4)


def test_product_distance_ignores_the_factorisation():
    lora = _random_lora()
    q = torch.tensor([[2.0, 1.0], [0.5, 3.0]])
    twisted = LoRA({k: (torch.linalg.inv(q) @ a, b @ q) for k, (a, b) in lora.factors.items()}, lora.scale)
    assert product_sq_distance(twisted, lora).max() < 1e-6 * product_sq_distance(lora).max()


def test_store_holds_condition_vectors_and_counts_its_bytes():
    store = ConditionStore()
    store.add(torch.randn(4, 10, 8), torch.tensor([0, 0, 3, 3]))
    store.add(torch.randn(2, 10, 8), torch.tensor([5, 5]))
    assert len(store) == 6 and set(store.tensors()) == {"conditions", "edit_ids"}
    assert store.conditions.dtype == torch.float16 and store.conditions.shape == (6, 10, 8)
    assert store.nbytes == 6 * 10 * 8 * 2 + 6


# ------------------------------------------------------------------ the protocol end to end


def tiny_config(tmp_path_factory, **changes):
    return ContinualConfig.quick(**{**dict(
        groups={"A": ["blur", "sharpen"], "B": ["brighten", "darken"]}, train_per_group=24, test_per_group=8,
        steps=3, batch=4, store_per_edit=2, replay_batch=4, forget_steps=3,
        editor={"width": 32, "depth": 2, "heads": 2}, cache_dir=str(tmp_path_factory.mktemp("cache"))), **changes})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The protocol on a tiny config, recording what every training call saw."""
    seen = []
    original = continual.train

    def recording_train(method, data, condition, cfg, lr, seed, name, **kwargs):
        seen.append((name, sorted(set(data.edit_ids.tolist())), kwargs.get("loss_fn")))
        return original(method, data, condition, cfg, lr, seed, name, **kwargs)

    def untrained_editor(config, *args, **kwargs):  # the protocol needs a frozen base, not a good one
        torch.manual_seed(0)
        return Editor(config).requires_grad_(False).eval()

    mp = pytest.MonkeyPatch()
    mp.setattr(continual, "train", recording_train)
    mp.setattr(continual, "load_or_train_editor", untrained_editor)
    cfg = tiny_config(tmp_path_factory)
    out = tmp_path_factory.mktemp("continual")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention on a shared CPU
    try:
        results = continual.run(cfg, out, forget="blur", progress=False)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out, cfg, results, seen


def test_every_stage_trains_on_its_own_group_only(tiny_run):
    _, cfg, _, seen = tiny_run
    groups = [sorted(EDIT_NAMES.index(e) for e in edits) for edits in cfg.groups.values()]
    assert len(seen) == len(continual.METHODS) * len(groups)
    for name, ids, _ in seen:
        stage = list(cfg.groups).index(name.rsplit("stage ", 1)[1])
        assert ids == groups[stage], name


def test_only_fm_replay_distils_and_only_after_the_first_stage(tiny_run):
    _, _, _, seen = tiny_run
    replay = {name: isinstance(loss, continual.ReplayLoss) for name, _, loss in seen}
    assert replay == {name: name == "fm_replay: stage B" for name in replay}


def test_results_have_matrices_metrics_storage_and_forget(tiny_run):
    out, cfg, _, _ = tiny_run
    r = json.loads((out / "continual.json").read_text())
    assert set(r["methods"]) == set(continual.METHODS)
    for m, entry in r["methods"].items():
        R = entry["matrix"]
        assert R[0][1] is None and all(math.isfinite(v) for row in R for v in row if v is not None)
        assert entry["average"] == pytest.approx(summarize(R)["average"])
        assert entry["mean_forgetting"] == pytest.approx(summarize(R)["mean_forgetting"])
        assert entry["storage_bytes"] > 0
    per_task = r["methods"]["per_task_lora"]["storage_bytes_by_stage"]
    shared = r["methods"]["shared_lora_sequential"]["storage_bytes"]
    assert per_task == [shared, 2 * shared]  # one more LoRA per stage
    store = r["methods"]["fm_replay"]["store"]
    assert store["conditions"] == 2 * 2 * cfg.store_per_edit  # 2 stages x 2 edits x store_per_edit
    assert store["shape"][-1] == cfg.condition_dim  # condition vectors, not 3 x S x S images
    assert r["methods"]["fm_replay"]["storage"]["store"] == store["bytes"] > 0
    assert r["methods"]["fm_naive"]["storage"]["store"] == 0
    f = r["forget"]
    assert f["edit"] == "blur"
    for key in ("removed_psnr_to_base", "kept_psnr_before", "kept_psnr_after"):
        assert math.isfinite(f[key])
    assert set(f["kept_per_edit_after"]) == {"sharpen", "brighten", "darken"}
    for name in ("continual.json", "continual.png", "continual.md"):
        assert (out / name).is_file(), name
    assert "Removing an edit" in (out / "continual.md").read_text()


def test_forgetting_uses_the_store_only(tiny_run, monkeypatch):
    """forget_edit's batches are indices into the store; it never touches an EditSet."""
    _, cfg, _, _ = tiny_run
    store = ConditionStore()
    store.add(torch.randn(4, 5, cfg.condition_dim), torch.tensor([0, 0, 1, 1]))
    calls = []

    class FakeMemory(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.generator = torch.nn.Linear(cfg.condition_dim, 6)

        @property
        def fm(self):  # EditingMemory's layout: memory.fm.generate / memory.fm.generator
            return self

        def generate(self, c):  # (n, L, D) -> a rank-1 LoRA on one 3 x 2 target
            calls.append(c.shape)
            h = self.generator(c.mean(1))  # (n, 6)
            return LoRA({"t": (h[:, None, :2], h[:, 2:5, None])}, 1.0)

    memory = FakeMemory()
    before = product_sq_distance(memory.generate(store.conditions[:2].float())).mean().item()
    continual.forget_edit(memory, store, 0, ContinualConfig(forget_steps=30, forget_lr=3e-2, replay_batch=2))
    after = product_sq_distance(memory.generate(store.conditions[:2].float())).mean().item()
    assert after < before
    assert all(s[-1] == cfg.condition_dim for s in calls)


def test_cli_registers_the_command(tmp_path):
    from funcmem.cli import build_parser

    args = build_parser().parse_args(["continual", "--quick", "--out", str(tmp_path), "--forget", "blur"])
    assert args.func is continual.cmd_continual and args.quick and args.forget == "blur"
    with pytest.raises(SystemExit):
        main(["continual", "--forget", "not_an_edit"])
