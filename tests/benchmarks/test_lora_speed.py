"""``funcmem bench lora`` runs end to end on tiny shapes and writes every section (no timing is
asserted: the figures are ratios for people to read)."""

import json

def test_bench_smoke_writes_every_section(tmp_path):
    from funcmem.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "lora", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"dynamic_overhead", "vs_naive_loop", "vs_merge_per_sample", "vs_peft", "batched_vs_sequential_decode",
            "mix", "generator_scaling", "generator_cost", "train_step_ratio", "goals"} <= set(result)
    assert {"ratio", "flop_share"} <= set(result["dynamic_overhead"][0])
    assert {r["distinct"] for r in result["mix"]} == {1, 6, 32}
    assert {"auto_overhead", "per_sample_overhead", "segmented_overhead"} <= set(result["mix"][0])
    assert {"factorized", "full"} == set(result["generator_scaling"]["slopes"])
    assert result["train_step_ratio"]["ratio"] > 0
