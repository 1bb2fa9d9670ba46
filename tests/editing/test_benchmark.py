"""The editing benchmark end to end on a tiny run: results.json has every key, the report and
pictures are written, and `funcmem edit` / `funcmem eval` work on the saved run."""

import json
import math

import pytest
import torch
from PIL import Image

from funcmem.cli import main
from funcmem.editing.benchmark import BenchmarkConfig, run
from funcmem.editing.benchmark.evaluate import mean_over_seeds
from funcmem.editing.benchmark.report import write_report
from funcmem.editing.benchmark.run import methods_table
from funcmem.editing.benchmark.sets import build_set
from funcmem.editing.benchmark.training import matched_rank
from funcmem.editing.editor import Editor, EditorConfig
from funcmem.editing.methods import Bank
from funcmem.editing.ops import FAMILY
from funcmem.editing.pretrain import NEUTRAL
from funcmem.editing.rundir import REQUIRED_FILES
from funcmem.editing.tasks import EVAL_SPLITS, HELD_OUT_PAIRS

METHOD_KEYS = {"identity", "base", "shared_lora", "shared_lora_matched", "per_task_lora", "retrieval_lora",
               "functional_memory"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = BenchmarkConfig.quick(train_examples=192, test_examples=72, steps=6, editor_steps=8, batch=8,
                                cache_dir=str(tmp_path_factory.mktemp("cache")), scaling_depths=[1, 2],
                                scaling_ranks=[2, 4], conflict_samples=4, editor={"width": 32, "depth": 2, "heads": 2},
                                skip_methods=[], conditions=["encoders", "label", "label-value"], warm_start=["label"],
                                warm_start_steps=20)
    results = run(cfg, out, progress=False)
    figures = torch.load(out / "figures.pt", weights_only=False)
    write_report(out, results, figures)
    return out, cfg


def check_contract(table: dict, families: set[str]) -> None:
    """``eval[split][method] = {psnr, psnr_std, ssim, per_edit}`` for every split; lora_sum on compositions only."""
    assert list(table) == list(EVAL_SPLITS)
    held_out_pairs = {f"{a} + {b}" for p in HELD_OUT_PAIRS for a, b in (p, p[::-1])}
    for split, methods in table.items():
        assert METHOD_KEYS <= set(methods), split
        assert ("lora_sum" in methods) == (split == "held_out_compositions")
        for m, entry in methods.items():
            assert {"psnr", "psnr_std", "ssim", "per_edit"} <= set(entry) and math.isfinite(entry["psnr"]), (split, m)
            edits = set(entry["per_edit"])
            if split == "held_out_compositions":
                assert edits <= held_out_pairs and edits
            else:
                assert edits <= families and edits, (split, m)
                if split.endswith("wording"):  # singles cycle through every edit
                    assert edits == families, (split, m)


@pytest.mark.slow
def test_results_json_has_every_key(tiny_run):
    out, cfg = tiny_run
    r = json.loads((out / "results.json").read_text())
    assert r["tasks"] == list(FAMILY)
    check_contract(r["eval"], set(FAMILY))
    for methods in r["eval"].values():  # doing nothing scores the same for every seed
        assert methods["identity"]["psnr_std"] == 0 and methods["base"]["psnr_std"] == 0
        assert methods["identity"]["per_seed_psnr"] == [methods["identity"]["psnr"]] * len(cfg.seeds)
    # a generator told the edit's label, and every method on training examples (fit, beside generalisation)
    assert all({"functional_memory[label]", "functional_memory[label-value]"} <= set(methods) for methods in r["eval"].values())
    assert METHOD_KEYS | {"functional_memory[label]"} <= set(r["methods_train"])
    assert all(math.isfinite(v["psnr"]) for v in r["methods_train"].values())
    warm = r["warm_start"]["functional_memory[label]"]  # distilled from the trained bank before its own training
    assert warm["steps"] == 20 and math.isfinite(warm["relative_error"]) and set(r["warm_start"]) == {"functional_memory[label]"}
    assert set(r["instruction_probe"]) == {"held_out_phrasings", "seen_phrasings"}
    assert all(0 <= v <= 1 for v in r["instruction_probe"].values())
    assert {"matched", "mismatched", "averaged", "no_lora"} == set(r["routing"])
    g = r["gradient_conflict"]
    assert {"matrix", "mean_inverse_pairs", "mean_all_pairs", "by_step"} <= set(g)
    assert sorted(g["by_step"], key=int) == ["0", "3", "6"]  # init, halfway, end
    assert len(g["matrix"]) == len(r["tasks"])
    assert -1 <= r["manifold"]["silhouette"] <= 1 and r["manifold"]["on"] == "updates"
    vs = r["manifold"]["value_spearman"]  # per edit with enough numeric values in seen wording + held-out values
    assert set(vs) == {"per_edit", "samples", "mean"} and all(0 <= v <= 1 for v in vs["per_edit"].values())
    assert set(r["scaling"]["depth"]) == {"1", "2"} and set(r["scaling"]["rank"]) == {"2", "4"}
    assert r["params"]["shared_lora_matched"] >= r["params"]["functional_memory"]
    assert r["storage"]["num_tasks"] == len(FAMILY)
    assert {"generate", "generate_and_edit", "base_edit"} <= set(r["timing"]["edit_latency_ms"])
    # no test photo is a train photo
    assert not set(r["splits"]["train_photos"]) & set(r["splits"]["test_photos"])
    assert r["splits"]["test_examples"] == {s: cfg.test_examples for s in EVAL_SPLITS}
    for name in ("report.md", "edits.png", "full_photos.png", "conflict.png", "manifold.png", "scaling.png", "manifest.json"):
        assert (out / name).is_file(), name
    for name in (*REQUIRED_FILES, "per_task_lora/keys.safetensors", "shared_lora_matched/config.json"):
        assert (out / name).is_file(), name  # the run directory
    report = (out / "report.md").read_text()
    assert "## Findings" in report and "held-out compositions" in report and "lora_sum" in report
    assert f"The test photo `{r['splits']['test_photos'][0]}`" in report and "![full photos](full_photos.png)" in report


@pytest.mark.slow
def test_edit_command_keeps_the_input_size(tiny_run, tmp_path):
    out, _ = tiny_run
    src = tmp_path / "in.png"
    Image.fromarray((torch.rand(45, 70, 3) * 255).byte().numpy()).save(src)
    dst = tmp_path / "out.png"
    assert main(["edit", "--run", str(out), str(src), "make it brighter", "-o", str(dst)]) == 0
    assert Image.open(dst).size == (70, 45)


@pytest.mark.slow
def test_eval_command_on_another_folder(tiny_run, tmp_path):
    out, _ = tiny_run
    for i in range(2):
        Image.fromarray((torch.rand(80, 90, 3) * 255).byte().numpy()).save(tmp_path / f"p{i}.png")
    assert main(["eval", "--run", str(out), "--images", str(tmp_path), "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    check_contract(result["eval"], set(FAMILY))


def test_matched_rank_reaches_the_generator_size():
    class T:
        in_features, out_features = 96, 288

    assert matched_rank(10_000, [T()]) == math.ceil(10_000 / 384)


def test_the_quick_run_has_two_seeds_and_leaves_out_the_matched_lora_and_the_label_row():
    quick, full = BenchmarkConfig.quick(), BenchmarkConfig()
    assert len(quick.seeds) == 2 and len(full.seeds) == 3
    names = lambda cfg: sorted(m.name for m in methods_table(cfg))
    trained = ["functional_memory", "per_task_lora", "shared_lora"]
    assert names(full) == sorted([*trained, "functional_memory[label]", "functional_memory[label-value]", "shared_lora_matched"])
    assert names(quick) == trained
    with_label = BenchmarkConfig.quick(conditions=["encoders", "label"])  # funcmem demo --condition encoders,label
    assert names(with_label) == sorted([*trained, "functional_memory[label]"])


def test_seed_aggregation():
    runs = [{"psnr": 20.0, "ssim": 0.5, "per_edit": {"a": {"psnr": 20.0, "ssim": 0.5}}},
            {"psnr": 22.0, "ssim": 0.7, "per_edit": {"a": {"psnr": 22.0, "ssim": 0.7}}}]
    m = mean_over_seeds(runs)
    assert m["psnr"] == 21.0 and m["psnr_std"] == pytest.approx(2 ** 0.5) and m["per_edit"]["a"]["psnr"] == 21.0


def test_lora_sum_adds_both_edits_updates():
    """Bank route "sum": B1 A1 + B2 A2 for a composition, the edit's own LoRA for a single edit."""
    torch.manual_seed(0)
    editor = Editor(EditorConfig(width=32, depth=1, heads=2, image_size=8))
    bank = Bank(editor, ["img_mlp.fc1"], rank=2, alpha=2.0, num=4)
    with torch.no_grad():
        for p in bank.parameters():
            p.normal_()
    batch = {"edit_ids": torch.tensor([0, 1, 3]), "second_ids": torch.tensor([2, -1, 0])}
    bank.route = "sum"
    summed = bank.summed(batch)
    A, B = bank.lora().factors[next(iter(bank.lora().factors))]
    a, b = summed.factors[next(iter(summed.factors))]
    delta = lambda i, j: B[i] @ A[i] + (B[j] @ A[j] if j >= 0 else 0)
    for row, (i, j) in enumerate([(0, 2), (1, -1), (3, 0)]):
        torch.testing.assert_close(b[row] @ a[row], delta(i, j))
    assert summed.scale == bank.lora().scale


def test_neutral_base_instruction_reaches_only_the_base(text_encoder):
    """--base-instruction neutral: the editor's text states are the neutral instruction's for every
    sample, while the condition encoders still read each instruction."""
    class LengthEncoder:  # a condition encoder whose stream is the instruction's length
        def raw(self, images, instructions):
            return {"length": torch.tensor([[float(len(t))] for t in instructions])}

    examples = {"inputs": torch.rand(3, 3, 8, 8), "targets": torch.rand(3, 3, 8, 8), "edit_ids": torch.tensor([0, 1, 2]),
                "instructions": ["make it brighter", "darken the photo by 40%", "tint it teal"]}
    cfg = EditorConfig(image_size=8)
    plain = build_set(examples, text_encoder, {"c": LengthEncoder()}, cfg, "cpu")
    neutral = build_set(examples, text_encoder, {"c": LengthEncoder()}, cfg, "cpu", base_text=NEUTRAL)
    keep, _ = text_encoder.encode([NEUTRAL], cfg.max_text_tokens)
    torch.testing.assert_close(neutral.text_states, keep.expand(3, -1, -1))
    assert not torch.equal(plain.text_states[0], plain.text_states[1])
    torch.testing.assert_close(neutral.raw["c"]["length"], plain.raw["c"]["length"])
    assert neutral.raw["c"]["length"][:, 0].tolist() == [16.0, 23.0, 12.0]
    with pytest.raises(ValueError, match="base_instruction"):
        BenchmarkConfig(base_instruction="nothing")


@pytest.mark.slow
def test_seeds_in_forked_processes_give_the_numbers_of_one_process(tmp_path):
    """Seeds trained side by side (--workers 2) evaluate exactly as when trained one after another."""
    from funcmem.editing.benchmark.run import prepare, train_methods
    from funcmem.editing.benchmark.training import Timer

    cfg = BenchmarkConfig.quick(train_examples=96, test_examples=24, steps=4, editor_steps=4, batch=8,
                                cache_dir=str(tmp_path), conflict_samples=2, editor={"width": 32, "depth": 2, "heads": 2},
                                warm_start_steps=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ctx = prepare(cfg, Timer(), progress=False)
        one = train_methods(ctx, Timer(), workers=1)
        side_by_side = train_methods(ctx, Timer(), workers=2)
    finally:
        torch.set_num_threads(threads)
    assert one.evals == side_by_side.evals and one.train == side_by_side.train
    assert (one.processes, side_by_side.processes) == (1, 2)  # what the report says ran
    assert len(one.evals["seen_wording"]["functional_memory"]) == len(cfg.seeds) == 2
    a, b = (e["psnr"] for e in one.evals["seen_wording"]["functional_memory"])
    assert a != b  # the two seeds really differ, so the comparison above sees the order


def test_seed_processes_follow_the_free_cores():
    from funcmem.threads import choose_processes

    assert choose_processes(2, cpus=2, busy=0.3)[0] == 2  # an idle 2-core machine: both seeds at once
    assert choose_processes(2, cpus=2, busy=1.2)[0] == 1 and choose_processes(2, cpus=2, busy=5.0)[0] == 1
    assert choose_processes(3, cpus=16, busy=0.0)[0] == 3  # at most one per seed
    assert 1 <= choose_processes(2)[0] <= 2  # from this machine's own numbers
    assert choose_processes(2, requested=4) == (2, "--workers")
    with pytest.raises(ValueError, match="processes must be >= 1"):
        choose_processes(2, requested=0)
