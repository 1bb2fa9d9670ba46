"""Threads: the CLI chooses from the free cores and says so once; --threads and OMP_NUM_THREADS
decide instead; importing the library changes nothing."""

import io
import os
import subprocess
import sys

import pytest
import torch

from funcmem.cli import main
from funcmem.threads import MAX_AUTO_THREADS, choose_threads, configure_threads


@pytest.mark.parametrize("cpus, load, expected", [
    (2, 0.0, 1),  # an idle 2-core laptop or CI runner: room for one more process
    (2, 1.3, 1),  # beside one busy process
    (2, 7.5, 1),  # a crowded machine
    (8, 1.0, 3),  # half of the 7 free cores
    (16, 15.9, 1),
    (128, 0.0, MAX_AUTO_THREADS),  # small models: more threads mostly wait
])
def test_half_the_free_cores_at_least_one(monkeypatch, cpus, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, why = choose_threads(cpus=cpus, load=load)
    assert threads == expected
    assert why == f"{cpus} cpus, load {load:.2f}"


def test_requested_threads_and_omp_num_threads_win(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_threads(cpus=2, load=9.0) == (3, "OMP_NUM_THREADS")
    assert choose_threads(5, cpus=2, load=9.0) == (5, "--threads")
    with pytest.raises(ValueError, match="threads must be >= 1"):
        choose_threads(0)


def test_configure_sets_torch_and_prints_one_line(keep_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = io.StringIO()
    assert configure_threads(2, stream=out) == 2 and torch.get_num_threads() == 2
    assert out.getvalue() == "threads: 2 (--threads)\n"
    out = io.StringIO()
    n = configure_threads(stream=out)
    assert torch.get_num_threads() == n
    assert out.getvalue().startswith(f"threads: {n} (") and out.getvalue().endswith("; --threads N to change)\n")


@pytest.mark.parametrize("where", ["before", "after"])
def test_the_cli_prints_its_choice_once(keep_threads, tmp_path, capsys, where):
    args = ["toy", "--steps", "2", "--out", str(tmp_path)]
    args = ["--threads", "1", *args] if where == "before" else [*args, "--threads", "1"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("threads:")] == ["threads: 1 (--threads)"]
    assert torch.get_num_threads() == 1


def test_importing_funcmem_leaves_torch_threads_alone():
    code = ("import torch; before = torch.get_num_threads(); import funcmem, funcmem.cli; "
            "print(before, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's own default: one per core
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    before, after = out.stdout.split()
    assert before == after
