"""Continual learning: the metric definitions on hand-made matrices, the protocol's data isolation,
and the command end to end on a tiny run (distillation itself: tests/test_distill.py)."""

import json
import math

import pytest
import torch

from funcmem.cli import main
from funcmem.editing import continual, rundir
from funcmem.editing.benchmark.config import BenchmarkConfig
from funcmem.editing.continual import EDIT_NAMES, ContinualConfig, learners, protocol, summarize
from funcmem.editing.continual.cli import config as config_from_flags
from funcmem.editing.editor import Editor
from funcmem.editing.ops import FAMILY, INVERSE_PAIRS

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


# ------------------------------------------------------------------ the protocol end to end


def tiny_config(tmp_path_factory):
    stages = BenchmarkConfig.quick(steps=3, batch=4, editor={"width": 32, "depth": 2, "heads": 2}, conditions=["encoders"],
                                   seeds=[0], cache_dir=str(tmp_path_factory.mktemp("cache")))
    return ContinualConfig.quick(stages, groups={"A": ["saturate", "desaturate"], "B": ["brighten", "darken"]},
                                 train_per_group=24, test_per_group=8, store_per_edit=2, replay_batch=4, forget_steps=3,
                                 relearn_steps=3)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The protocol on a tiny config, recording what every training call saw."""
    seen = []
    original = learners.train

    def recording_train(method, data, condition, cfg, lr, seed, name, **kwargs):
        seen.append((name, sorted(set(data.edit_ids.tolist())), kwargs.get("loss_fn")))
        return original(method, data, condition, cfg, lr, seed, name, **kwargs)

    def untrained_editor(config, *args, **kwargs):  # the protocol needs a frozen base, not a good one
        torch.manual_seed(0)
        return Editor(config).requires_grad_(False).eval()

    mp = pytest.MonkeyPatch()
    mp.setattr(learners, "train", recording_train)
    mp.setattr(protocol, "load_or_train_editor", untrained_editor)
    cfg = tiny_config(tmp_path_factory)
    out = tmp_path_factory.mktemp("continual")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds contention on a shared CPU
    try:
        results = continual.run(cfg, out, forget="saturate", progress=False)
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return out, cfg, results, seen


@pytest.mark.slow
def test_every_stage_trains_on_its_own_group_only(tiny_run):
    _, cfg, _, seen = tiny_run
    groups = [sorted(EDIT_NAMES.index(e) for e in edits) for edits in cfg.groups.values()]
    assert len(seen) == len(continual.METHODS) * len(groups)
    for name, ids, _ in seen:
        stage = list(cfg.groups).index(name.rsplit("stage ", 1)[1])
        assert ids == groups[stage], name


@pytest.mark.slow
def test_only_fm_replay_distils_and_only_after_the_first_stage(tiny_run):
    _, _, _, seen = tiny_run
    replay = {name: isinstance(loss, learners.ReplayLoss) for name, _, loss in seen}
    assert replay == {name: name == "fm_replay: stage B" for name in replay}


@pytest.mark.slow
def test_results_have_matrices_metrics_storage_and_forget(tiny_run):
    out, cfg, _, _ = tiny_run
    r = json.loads((out / "continual.json").read_text())
    assert set(r["methods"]) == set(continual.METHODS)
    for entry in r["methods"].values():
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
    assert store["shape"][-1] == cfg.benchmark.condition_dim  # condition vectors, not 3 x S x S images
    assert r["methods"]["fm_replay"]["storage"]["store"] == store["bytes"] > 0
    assert r["methods"]["fm_naive"]["storage"]["store"] == 0
    f = r["forget"]
    assert f["edits"] == ["saturate"]
    assert f["neighbourhood"] == cfg.forget_near and f["gate"] == cfg.forget_gate  # the removal ran with the gate
    for key in ("removed_psnr_to_base", "removed_psnr_to_base_seen", "kept_psnr_before", "kept_psnr_after",
                "near_miss_psnr_before", "near_miss_psnr_after", "relearn_psnr"):
        assert math.isfinite(f[key]), key
    assert set(f["kept_per_edit_after"]) == {"desaturate", "brighten", "darken"}
    assert "desaturate" in f["near_miss_edits"] and set(f["near_miss_per_edit_after"]) == set(f["near_miss_edits"])
    for name in ("continual.json", "continual.png", "continual.md"):
        assert (out / name).is_file(), name
    assert "Removing edits" in (out / "continual.md").read_text()
    assert r["config"]["benchmark"]["steps"] == cfg.benchmark.steps  # the stages' settings, by composition


@pytest.mark.slow
def test_the_run_directory_holds_the_replay_generator(tiny_run, monkeypatch):
    """``funcmem edit`` / ``eval`` / ``serve`` load a continual run like a demo run."""
    out, cfg, _, _ = tiny_run
    monkeypatch.setattr(rundir, "TextEncoder", lambda: None)  # no MiniLM: only the saved parts are checked
    monkeypatch.setattr(rundir, "make_encoder", lambda name, editor, text: type("E", (), {"raw_dims": raw_dims})())
    raw_dims = rundir.read_json(out / "functional_memory" / "projector.json")["raw_dims"]
    run = rundir.load_run(out)
    assert set(run.methods) == {"base", "functional_memory"} and run.size == cfg.benchmark.size
    assert run.memory.fm.rank == cfg.benchmark.rank


def test_cli_registers_the_command_with_the_shared_flags(tmp_path):
    from funcmem.cli import build_parser
    from funcmem.editing.continual import cli

    argv = ["continual", "--quick", "--out", str(tmp_path), "--forget", "saturate", "--steps", "7", "--images", "x"]
    args = build_parser(argv).parse_args(argv)
    assert args.run_cli is cli.run_cli and args.quick and args.forget == ["saturate"]
    cfg = config_from_flags(args)
    assert cfg.benchmark.steps == 7 and cfg.benchmark.images == "x" and cfg.train_per_group == 384
    assert config_from_flags(build_parser(["continual"]).parse_args(["continual"])).benchmark.steps == 600
    assert main(["continual", "--forget", "not_an_edit"]) == 2  # one line on stderr (tests/editing/test_cli_errors.py)


def test_the_groups_teach_the_benchmark_family_with_inverse_pairs_together():
    taught = [e for edits in continual.GROUPS.values() for e in edits]
    assert sorted(taught) == sorted(FAMILY) and EDIT_NAMES == list(FAMILY)
    stage = {e: name for name, edits in continual.GROUPS.items() for e in edits}
    for a, b in INVERSE_PAIRS:
        if a in stage or b in stage:
            assert stage[a] == stage[b], (a, b)
