"""Every script under examples/ runs on a tiny setting (a few training steps, its own tiny model) in a
fresh interpreter, and prints the checks it makes. A new example must be added to ``RUNS``."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# script -> (modules it needs, arguments for a tiny run, lines its output must hold); None: run elsewhere
RUNS = {
    "quickstart.py": None,  # the README's quickstart, run by tests/test_readme.py
    "hf_decoder.py --arch llama": (["transformers"], ["--arch", "llama", "--steps", "3", "--batch", "4"],
                                   ["reloaded outputs identical: True", "mounted vs merged"]),
    "hf_decoder.py --arch qwen3_moe": (["transformers"], ["--arch", "qwen3_moe", "--steps", "3", "--batch", "4"],
                                       ["reloaded outputs identical: True", "mounted vs merged"]),
    "diffusers_mmdit.py": (["diffusers"], ["--steps", "3", "--batch", "4"], ["reloaded sampler output identical: True"]),
    "train_distributed.py": ([], ["--steps", "3", "--batch", "4"], ["none x 1 process(es): loss"]),
}


def test_every_example_has_a_tiny_run():
    assert {name.split()[0] for name in RUNS} == {p.name for p in EXAMPLES.glob("*.py")}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, run in RUNS.items() if run is not None])
def test_example_runs(name, tmp_path):
    needs, args, expected = RUNS[name]
    for module in needs:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{name} needs {module}")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, str(EXAMPLES / name.split()[0]), *args, "--out", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    for line in expected:
        assert line in done.stdout, done.stdout
    merged = re.search(r"mounted vs merged, sample 0: max \|diff\| = (\S+)", done.stdout)
    assert merged is None or float(merged.group(1)) < 1e-5
