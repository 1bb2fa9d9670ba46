"""The console script."""

import json
import subprocess
import sys


def test_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "funcmem.cli", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout


def test_toy_command_writes_results(tmp_path):
    from funcmem.cli import main

    assert main(["toy", "--steps", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "toy.json").read_text())
    assert {"generator", "shared_lora", "base"} <= set(result)
