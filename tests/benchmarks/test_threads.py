"""``funcmem bench threads`` runs every policy in its own process and writes ratios to the default
(no speed is asserted: on a shared machine the figures are for people to read)."""

import json

import pytest


@pytest.mark.usefixtures("keep_threads")
def test_bench_threads_writes_every_policy(tmp_path, capsys):
    from funcmem.cli import main

    out = tmp_path / "threads.json"
    assert main(["bench", "threads", "--seconds", "0.2", "--burners", "0", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["runs"]["burners_0"]["policies"]
    assert set(rows) == {"default", "one", "cli_choice", "all_passive"}
    assert rows["one"]["threads"] == 1 and rows["default"]["over_default"] == 1.0
    assert all(r["steps_per_s"] > 0 for r in rows.values())
    assert "x the default" in capsys.readouterr().out
