"""Files: pickles never run, writes are atomic, damaged files are refused by name, and two
processes writing the same cache entry never corrupt it."""

import json
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import funcmem
import funcmem.cli
from funcmem import io
from funcmem.io import PickleRefusedError, atomic_write, load_safetensors_dir, load_tensors, read_safetensors

SRC = Path(funcmem.__file__).parent
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the raw pickles we plant


class Exploit:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def planted(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"weight": Exploit(marker)})
    files = {}
    for name in ("evil.pt", "evil.bin", "evil.ckpt"):
        (tmp_path / name).write_bytes(payload)
        files[name] = tmp_path / name
    (tmp_path / "evil.safetensors").write_bytes(payload)  # a pickle under a safe name
    torch.save({"weight": Exploit(marker)}, tmp_path / "evil_zip.pt")  # torch's zip format
    return marker, tmp_path


def test_a_planted_pickle_never_executes(planted):
    marker, folder = planted
    for name in ("evil.pt", "evil.bin", "evil.ckpt", "evil_zip.pt"):
        with pytest.raises(PickleRefusedError, match=rf"refusing to load .*{name}.*allow_pickle=True"):
            load_tensors(folder / name)
        with pytest.raises(ValueError, match=rf"cannot load .*{name} with torch.load\(weights_only=True\)"):
            load_tensors(folder / name, allow_pickle=True)  # opted in: still no code runs
    with pytest.raises(ValueError, match="cannot read .*evil.safetensors as safetensors"):
        load_tensors(folder / "evil.safetensors")
    assert not marker.exists()


def test_directories_holding_only_pickles_are_refused(planted, tmp_path):
    marker, folder = planted
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes((folder / "evil.bin").read_bytes())
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):
        load_safetensors_dir(d)
    with pytest.raises(ValueError):
        load_safetensors_dir(d, allow_pickle=True)
    (d / "config.json").write_text(json.dumps({"model_type": "parameter_generator"}))
    with pytest.raises((ValueError, FileNotFoundError)):
        funcmem.hywu.load_generator(d)
    peft = tmp_path / "peft"
    peft.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["qkv"]}
    (peft / "adapter_config.json").write_text(json.dumps(config))
    (peft / "adapter_model.bin").write_bytes((folder / "evil.bin").read_bytes())
    from helpers import TinyTransformer

    with pytest.raises(FileNotFoundError, match="pickle"):
        funcmem.peft_io.read_peft(peft, TinyTransformer())
    assert not marker.exists()


def test_an_opted_in_plain_state_dict_loads(tmp_path):
    state = {"a": torch.arange(3.0), "b": torch.ones(2, 2)}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_tensors(tmp_path / "ok.pt", allow_pickle=True)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning.ckpt")
    assert load_tensors(tmp_path / "lightning.ckpt", allow_pickle=True).keys() == state.keys()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="not hold a state dict"):
        load_tensors(tmp_path / "list.pt", allow_pickle=True)


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for file in SRC.rglob("*.py"):
        for line_no, line in enumerate(file.read_text().splitlines(), 1):
            if re.search(r"torch\.load\(", line) and not line.lstrip().startswith("#"):
                calls.append((file.relative_to(SRC), line_no, line.strip()))
    assert calls, "expected funcmem.io.torch_load"
    for file, line_no, line in calls:
        assert "weights_only=True" in line, f"{file}:{line_no}: {line}"
        assert "weights_only=False" not in line
    assert not any("pickle.load" in f.read_text() for f in SRC.rglob("*.py"))


def test_torch_load_allows_numeric_numpy_only(tmp_path):
    import numpy as np

    torch.save({"pca": np.zeros((3, 2)), "labels": np.arange(3), "names": ["a"]}, tmp_path / "fig.pt")
    figures = io.torch_load(tmp_path / "fig.pt", allow_numpy=True)
    assert figures["labels"].tolist() == [0, 1, 2]
    with pytest.raises(pickle.UnpicklingError):
        io.torch_load(tmp_path / "fig.pt")
    torch.save({"obj": np.array([{"x": 1}], dtype=object)}, tmp_path / "obj.pt")
    with pytest.raises(pickle.UnpicklingError):
        io.torch_load(tmp_path / "obj.pt", allow_numpy=True)


# ---------------------------------------------------------------- damaged files


def test_truncated_or_garbage_safetensors_are_refused_by_name(tmp_path):
    io.write_safetensors(tmp_path / "w.safetensors", {"x": torch.randn(64, 64)})
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (0, 7, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"cannot read .*cut\.safetensors as safetensors"):
            read_safetensors(tmp_path / "cut.safetensors")
    (tmp_path / "bad.json").write_text('{"rank": 4,')
    with pytest.raises(ValueError, match=r"cannot read .*bad\.json as JSON"):
        io.read_json(tmp_path / "bad.json")


def test_a_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "f.json"
    io.write_json(path, {"v": 1})

    def half_then_crash(tmp):
        Path(tmp).write_text('{"v": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_crash)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


WRITER = textwrap.dedent("""
    import sys, torch
    from funcmem.io import write_safetensors
    path, value = sys.argv[1], float(sys.argv[2])
    for i in range(int(sys.argv[3])):
        write_safetensors(path, {"x": torch.full((256, 256), value), "i": torch.tensor([i])})
""")


@pytest.mark.slow
def test_two_processes_writing_one_file_never_leave_it_corrupt(tmp_path):
    path = tmp_path / "entry.safetensors"
    io.write_safetensors(path, {"x": torch.zeros(256, 256), "i": torch.tensor([0])})
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(v), "12"]) for v in (1.0, 2.0)]
    reads = 0
    while any(p.poll() is None for p in procs):
        x = read_safetensors(path)["x"]  # every read sees one whole version
        assert x.unique().numel() == 1 and float(x[0, 0]) in (0.0, 1.0, 2.0)
        reads += 1
    assert all(p.returncode == 0 for p in procs) and reads > 0
    assert float(read_safetensors(path)["x"][0, 0]) in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["entry.safetensors"]


def test_a_kill_during_a_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "entry.safetensors"
    io.write_safetensors(path, {"x": torch.zeros(8)})
    slow = WRITER.replace("import sys, torch", "import sys, time, torch\nimport safetensors.torch as st\n"
                          "_save = st.save_file\n"
                          "def save_file(t, p, metadata=None):\n"
                          "    open(p, 'wb').write(b'half')\n"
                          "    time.sleep(30)\n"
                          "st.save_file = save_file\n"
                          "import funcmem.io; funcmem.io.save_file = save_file")
    proc = subprocess.Popen([sys.executable, "-c", slow, str(path), "5.0", "1"])
    deadline = time.time() + 30
    while not any(p.name.endswith(".tmp") and p.stat().st_size for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.equal(read_safetensors(path)["x"], torch.zeros(8))  # the old version, whole


KILLED_CONVERT = """
import sys, time
import funcmem.hywu
funcmem.hywu.write_json = lambda *a, **k: time.sleep(60)  # killed after the weights, before config.json
funcmem.hywu.convert_to_funcmem(sys.argv[1], sys.argv[2])
"""


def test_a_killed_convert_leaves_no_destination_and_a_rerun_works(tmp_path):
    from test_hywu import grouped_config, random_state, write_checkpoint

    config = grouped_config()
    write_checkpoint(tmp_path / "hywu", config, random_state(config))
    dst = tmp_path / "out" / "fm"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CONVERT, str(tmp_path / "hywu"), str(dst)])
    deadline = time.time() + 60
    while not list((tmp_path / "out").glob(".fm.*.tmp/model.safetensors")):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not dst.exists()  # nothing half-written where the user looks
    assert funcmem.cli.main(["convert", "hywu-to-funcmem", str(tmp_path / "hywu"), str(dst)]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["fm"]  # the dead run's temporary folder is gone
    assert funcmem.io.read_json(dst / "config.json")["funcmem_type"] == "FunctionalMemory"


def test_atomic_directory_refuses_a_non_empty_destination_and_cleans_up_after_an_error(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="full exists and is not an empty directory"):
        with io.atomic_directory(tmp_path / "full"):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_directory(tmp_path / "new") as tmp:
            (tmp / "half").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    (tmp_path / "empty").mkdir()
    with io.atomic_directory(tmp_path / "empty") as tmp:  # an empty directory is replaced
        (tmp / "a").write_text("a")
    assert (tmp_path / "empty" / "a").read_text() == "a"
