"""The run directory: every part round-trips through save_pretrained / from_pretrained; an older or
incomplete directory, or one saved for another editor, is refused with the file or target named."""

import shutil

import pytest
import torch

from funcmem.editing import rundir

from .tiny_run import make_tiny_run


class Streams:
    """A condition encoder's interface without loading MiniLM / EfficientNet: only ``raw_dims``."""

    def __init__(self, raw_dims):
        self.raw_dims = raw_dims


@pytest.fixture
def offline_encoders(monkeypatch):
    from funcmem.editing.conditions import MiniLMEfficientNet
    from types import SimpleNamespace

    dims = MiniLMEfficientNet(SimpleNamespace(dim=384), SimpleNamespace(dim=1280)).raw_dims
    monkeypatch.setattr(rundir, "TextEncoder", lambda: None)
    monkeypatch.setattr(rundir, "make_encoder", lambda name, editor, text: Streams(dims))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_a_saved_run_loads_every_method_bit_for_bit(saved, offline_encoders):
    run = rundir.load_run(saved)
    again = rundir.load_run(saved)
    assert set(run.methods) == {"base", "functional_memory", "shared_lora", "shared_lora_matched", "per_task_lora"}
    assert run.size == run.config["size"] and run.condition == "encoders"
    c = torch.randn(3, 4, run.memory.fm.condition_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = run.memory.fm.generate(c), again.memory.fm.generate(c)
    for name, (fa, fb) in a.factors.items():
        assert torch.equal(fa, b.factors[name][0]) and torch.equal(fb, b.factors[name][1])
    assert any(f.abs().sum() > 0 for f in a.factors[next(iter(a.factors))])  # a non-trivial generator
    assert torch.equal(run.methods["per_task_lora"].keys, again.methods["per_task_lora"].keys)
    assert run.methods["per_task_lora"].keys.shape[1] == 4
    assert run.methods["shared_lora_matched"].rank == 2 * run.methods["shared_lora"].rank
    state, other = run.editor.state_dict(), again.editor.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(v, other[k]) for k, v in state.items())


def test_an_older_run_directory_names_the_missing_file(saved, tmp_path, offline_encoders):
    old = tmp_path / "old"
    shutil.copytree(saved, old)
    shutil.rmtree(old / "editor")  # older runs kept editor.json / editor.safetensors at the top
    with pytest.raises(FileNotFoundError, match=r"has no editor/config\.json \(and 1 more\): it was written by an older"):
        rundir.load_run(old)
    (old / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        rundir.load_run(old)


def test_a_generator_saved_for_other_targets_is_refused(saved, tmp_path, offline_encoders):
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    config = rundir.read_json(other / "functional_memory" / "config.json")
    name = next(iter(config["resolved_targets"]))
    config["resolved_targets"][name][1] += 1  # in_features
    rundir.write_json(other / "functional_memory" / "config.json", config)
    with pytest.raises(ValueError, match=rf"target '{name}' is \[kind, in, out, experts\]"):
        rundir.load_run(other)


def test_a_run_saves_a_generator_and_known_methods_only(saved, tmp_path):
    run_config = rundir.read_json(saved / "config.json")
    with pytest.raises(ValueError, match="a run saves 'functional_memory'"):
        rundir.save_run(tmp_path, run_config, None, {"shared_lora": None})
