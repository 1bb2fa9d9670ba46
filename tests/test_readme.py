"""The README's Python blocks marked runnable (the ```python block right after a ``<!-- runnable -->``
line) run as written: each in a fresh interpreter, from an empty directory, with whatever is
installed (the core alone in ``make test-core``). The first Python block is the quickstart; it must
be marked, its printed numbers must show what the README says, and ``examples/quickstart.py`` must
hold the same code."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKED = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.S | re.M)
PYTHON = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BLOCKS = MARKED.findall(README)


def run_block(code: str, cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"README block failed:\n{code}\n--- stderr ---\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_first_python_block_is_the_marked_quickstart():
    assert BLOCKS, "the README has no block marked <!-- runnable -->"
    assert PYTHON.findall(README)[0] == BLOCKS[0]


def test_examples_quickstart_is_the_readme_quickstart():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    code = example[example.index('"""', 3) + 3:].strip()  # after the docstring
    assert code == BLOCKS[0].strip()


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_each_runnable_block_runs(tmp_path, index):
    out = run_block(BLOCKS[index], tmp_path)
    if index == 0:  # the quickstart: the generator wins where one shared LoRA cannot do better than the base
        numbers = dict(re.findall(r"(frozen base|shared LoRA|generator) ([0-9.]+)", out))
        base, shared, generator = (float(numbers[k]) for k in ("frozen base", "shared LoRA", "generator"))
        assert shared > 0.9 * base and generator < shared / 10, out
