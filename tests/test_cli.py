"""The console script: every command listed without importing the application; commands run."""

import json
import subprocess
import sys

import pytest

from funcmem.cli import COMMANDS, Command, load, main

APPLICATION = ("PIL", "transformers", "matplotlib", "sklearn", "fastapi", "uvicorn", "funcmem.editing", "funcmem.serve")


def test_help_lists_every_command_without_importing_the_application():
    code = ("import sys\nfrom funcmem.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in sys.modules if m.startswith({APPLICATION!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"    {name}" in out, name
    assert out.strip().endswith("LOADED []")


def test_a_missing_extra_names_what_to_install():
    with pytest.raises(SystemExit, match=r"funcmem demo needs the 'editing' extra \(no_such_package_xyz is "
                                         r"missing\): pip install 'funcmem\[editing\]'"):
        load("demo", Command("no_such_package_xyz.module", "help", "editing"))
    with pytest.raises(ModuleNotFoundError):  # a broken funcmem module is not blamed on an extra
        load("demo", Command("funcmem.no_such_module", "help", "editing"))


def test_bench_is_a_group_with_every_registered_benchmark(capsys):
    from funcmem.benchmarks import BENCHMARKS

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in ["all", *BENCHMARKS])


def test_toy_command_writes_results(tmp_path):
    assert main(["toy", "--steps", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "toy.json").read_text())
    assert {"generator", "shared_lora", "base"} <= set(result)
