"""The console script: every command listed without importing the application; commands run; every
user error is one line on stderr with status 2, and a bug keeps its traceback."""

import json
import re
import subprocess
import sys

import pytest
import torch

from funcmem.cli import COMMANDS, Command, UsageError, load, main
from helpers import user_error

pytestmark = pytest.mark.usefixtures("keep_threads")  # commands set torch's threads (--threads)
APPLICATION = ("PIL", "transformers", "matplotlib", "sklearn", "fastapi", "uvicorn", "funcmem.editing", "funcmem.serve")


def test_help_lists_every_command_without_importing_the_application():
    code = ("import sys\nfrom funcmem.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            f"print('LOADED', sorted(m for m in sys.modules if m.startswith({APPLICATION!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert f"    {name}" in out, name
    assert out.strip().endswith("LOADED []")


def test_a_missing_extra_names_what_to_install():
    with pytest.raises(UsageError, match=r"funcmem demo needs the 'editing' extra \(no_such_package_xyz is "
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


# ---------------------------------------------------------------- user errors: one line, status 2


@pytest.mark.parametrize("args, message", [
    ([], r"funcmem: the following arguments are required: COMMAND \(see funcmem --help\)"),
    (["nope"], r"funcmem: argument COMMAND: invalid choice: 'nope'"),
    (["--threads", "0", "toy"], r"argument --threads: expected a positive integer, got 0"),
    (["toy", "--threads", "two"], r"funcmem toy: argument --threads: expected a positive integer, got 'two'"),
    (["toy", "--steps", "abc"], r"funcmem toy: argument --steps: expected a positive integer, got 'abc'"),
    (["toy", "--steps", "0"], r"argument --steps: expected a positive integer, got 0"),
    (["bench", "nope"], r"funcmem bench: argument BENCHMARK: invalid choice: 'nope'"),
    (["bench", "lora", "--device", "tpu"], r"funcmem bench lora: argument --device: invalid choice: 'tpu'"),
    (["convert"], r"funcmem convert: the following arguments are required: direction"),
])
def test_bad_arguments_are_one_line(capsys, args, message):
    assert re.search(message, user_error(capsys, args))


def test_toy_onto_a_file_is_one_line(capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    line = user_error(capsys, ["--threads", "1", "toy", "--steps", "1", "--out", str(tmp_path / "file")])
    assert line == f"error: --out {tmp_path / 'file'} is a file; name a folder"


def test_bench_on_a_missing_gpu_is_one_line(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    line = user_error(capsys, ["--threads", "1", "bench", "lora", "--smoke", "--device", "cuda",
                               "--out", str(tmp_path / "x.json")])
    assert line == "error: --device cuda: this PyTorch sees no CUDA GPU; use --device cpu"


def test_convert_errors_are_one_line(capsys, tmp_path):
    from test_hywu import grouped_config, random_state, write_checkpoint

    config = grouped_config()
    write_checkpoint(tmp_path / "hywu", config, random_state(config))
    convert = ["convert", "hywu-to-funcmem"]
    line = user_error(capsys, [*convert, str(tmp_path / "nope"), str(tmp_path / "out")])
    assert line == f"error: {tmp_path / 'nope'} is not a HY-WU checkpoint directory: no config.json"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    line = user_error(capsys, [*convert, str(tmp_path / "hywu"), str(tmp_path / "full")])
    assert line == f"error: {tmp_path / 'full'} exists and is not an empty directory; choose a new destination"
    line = user_error(capsys, ["convert", "funcmem-to-hywu", str(tmp_path / "hywu"), str(tmp_path / "out")])
    assert line == (f"error: {tmp_path / 'hywu'} holds no funcmem_type (it is not a funcmem directory), "
                    "not a 'FunctionalMemory'")
    (tmp_path / "hywu" / "config.json").write_text(json.dumps({**config, "rank": 4.9}))
    line = user_error(capsys, [*convert, str(tmp_path / "hywu"), str(tmp_path / "out")])
    assert line == "error: HY-WU config.json: rank must be an integer, got 4.9"
    (tmp_path / "hywu" / "config.json").write_text(json.dumps({**config, "num_base_model_layers": 3}))
    line = user_error(capsys, [*convert, str(tmp_path / "hywu"), str(tmp_path / "out")])  # a message of 2 lines
    assert line == ("error: HY-WU weights do not fit their config.json: model.layer_pos.weight: checkpoint "
                    "(2, 32) vs config (3, 32)")
    (tmp_path / "hywu" / "config.json").write_text("{damaged")
    line = user_error(capsys, [*convert, str(tmp_path / "hywu"), str(tmp_path / "out")])
    assert line.startswith(f"error: cannot read {tmp_path / 'hywu' / 'config.json'} as JSON: ")
    assert not (tmp_path / "out").exists()


def test_a_missing_extra_is_one_line(capsys, monkeypatch):
    monkeypatch.setitem(COMMANDS, "toy", Command("no_such_package_xyz.module", "help", "editing"))
    assert user_error(capsys, ["toy"]) == ("error: funcmem toy needs the 'editing' extra (no_such_package_xyz is "
                                          "missing): pip install 'funcmem[editing]'")


def test_debug_shows_the_traceback_and_a_bug_keeps_it(capsys, monkeypatch, tmp_path):
    import funcmem.toy

    args = ["--threads", "1", "toy", "--steps", "1", "--out", str(tmp_path / "file")]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match='is a file'):
        main(["--debug", *args])
    with pytest.raises(UsageError, match='is a file'):
        main([*args, "--debug"])
    monkeypatch.setenv("FUNCMEM_DEBUG", "1")
    with pytest.raises(UsageError, match='is a file'):
        main(args)
    monkeypatch.delenv("FUNCMEM_DEBUG")
    monkeypatch.setattr(funcmem.toy, "run_cli", lambda args: int("a bug, not the user's input"))
    with pytest.raises(ValueError, match="invalid literal"):  # a ValueError raised outside funcmem: a bug
        main(["--threads", "1", "toy"])
    monkeypatch.setattr(funcmem.toy, "run_cli", lambda args: torch.zeros(2).view(3))
    with pytest.raises(RuntimeError, match="shape"):
        main(["--threads", "1", "toy"])


def test_an_interrupt_is_one_line_and_status_130(capsys, monkeypatch):
    import funcmem.toy

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(funcmem.toy, "run_cli", interrupted)
    assert main(["--threads", "1", "toy"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted"


def test_the_console_script_prints_one_line(tmp_path):
    """The installed entry point (a fresh process): no traceback, status 2."""
    proc = subprocess.run([sys.executable, "-m", "funcmem.cli", "convert", "hywu-to-funcmem", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'nope'} is not a HY-WU checkpoint directory: no config.json\n"
