"""Training beyond one process (``funcmem.distributed`` + ``Trainer``), checked on CPU with gloo.

One ``torchrun --nproc_per_node 2`` launch (this file is also the worker script) runs four short
trainings of the toy conflicting-tasks problem with global batch 8: DDP and FSDP to the end, and
DDP and FSDP stopped after the step-3 checkpoint. The tests compare them with 1-process runs of
the same global batch, and resume the 2-process checkpoints in 1 process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from funcmem import FunctionalMemory, GeneratorConfig
from funcmem.distributed import resolve_mode, shard_batch
from funcmem.toy import ConflictingTasks, ToyMLP
from funcmem.train import CHECKPOINT_NAME, Trainer, TrainConfig

STEPS, GLOBAL_BATCH, STOP_AT = 6, 8, 3
RUNS = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), "ddp_stopped": ("ddp", STOP_AT),
        "fsdp_stopped": ("fsdp", STOP_AT)}


class Stop(Exception):
    """Raised by a callback on every rank: a run killed right after a checkpoint."""


def make_trainer(mode: str, out_dir: str | None) -> tuple[Trainer, ConflictingTasks]:
    torch.manual_seed(0)
    base = ToyMLP(dim=8, depth=2)
    tasks = ConflictingTasks(base, num_pairs=2, cond_dim=8)
    fm = FunctionalMemory(base, targets=["fc1", "fc2"], rank=2, condition_dim=8,
                          generator=GeneratorConfig(d_model=32, depth=2, head_dim=8, token_dim=16))

    def loss_fn(m, batch):
        cond, x, y, _ = batch
        return ((m(cond, x) - y) ** 2).mean()

    cfg = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=2, out_dir=out_dir, checkpoint_every=STOP_AT,
                      log_every=1, progress=False, distributed=mode)
    blocks = list(fm.generator.model.blocks.parameters())  # own LR: FSDP must remap groups to its shards
    rest = [q for q in fm.trainable_parameters() if all(q is not b for b in blocks)]
    groups = [{"params": blocks, "lr_scale": 0.5}, {"params": rest}]
    return Trainer(fm, loss_fn, cfg, param_groups=groups), tasks


def fit(trainer: Trainer, tasks: ConflictingTasks, stop_at: int | None = None, resume: bool = False) -> list[float]:
    def stop(t):
        if stop_at is not None and t.step == stop_at:
            raise Stop

    try:
        trainer.fit(lambda step: tasks.batch(step, GLOBAL_BATCH), resume=resume, callback=stop)
    except Stop:
        pass
    return [r["loss"] for r in trainer.history]


def generator_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    from funcmem.distributed import full_tensor

    return {n: full_tensor(p.detach()).clone() for p, n in trainer.names.items()}


def worker(root: str) -> None:
    """Body of each torchrun process: the four runs, results written by rank 0."""
    from funcmem import distributed

    torch.set_num_threads(1)
    results = {}
    for name, (mode, stop_at) in RUNS.items():
        trainer, tasks = make_trainer(mode, os.path.join(root, name))
        assert trainer.mode == mode, (trainer.mode, mode)
        losses = fit(trainer, tasks, stop_at)
        state = generator_state(trainer)
        if distributed.is_main():
            results[name] = losses
            torch.save(state, os.path.join(root, name, "final_state.pt"))
    if distributed.is_main():
        results["world_size"] = distributed.world_size()
        Path(root, "results.json").write_text(json.dumps(results))
    distributed.cleanup()


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def two_process(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", str(root)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return root


@pytest.fixture(scope="module")
def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    """The 1-process run with the same global batch."""
    trainer, tasks = make_trainer("none", None)
    return fit(trainer, tasks), generator_state(trainer)


def _results(root: Path) -> dict:
    return json.loads((root / "results.json").read_text())


# ------------------------------------------------------------------------------ tests


def test_shard_batch_cuts_every_batch_tensor_contiguously():
    batch = {"x": torch.arange(8).view(8, 1), "pair": (torch.arange(8) * 2, torch.ones(3)), "name": "edit"}
    shards = [shard_batch(batch, r, 2) for r in range(2)]
    assert shards[1]["x"].flatten().tolist() == [4, 5, 6, 7]
    assert shards[0]["pair"][0].tolist() == [0, 2, 4, 6]
    assert shards[0]["pair"][1].shape == (3,) and shards[0]["name"] == "edit"  # not batch-shaped: kept
    assert torch.equal(torch.cat([s["x"] for s in shards]), batch["x"])
    with pytest.raises(ValueError, match="not divisible"):
        shard_batch(batch, 0, 3)


def test_resolve_mode_single_process_and_bad_names(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_mode("auto") == "none" and resolve_mode("ddp") == "none"
    with pytest.raises(ValueError, match="distributed must be one of"):
        resolve_mode("horovod")


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_loss_curve(two_process, reference, run):
    """2 processes x batch 4 (DDP, or FSDP-sharded generator) == 1 process x batch 8, step for step."""
    results = _results(two_process)
    assert results["world_size"] == 2
    ref_losses, ref_state = reference
    losses = torch.tensor(results[run])
    assert len(losses) == STEPS
    assert torch.allclose(losses, torch.tensor(ref_losses), rtol=1e-4, atol=1e-7), (losses, ref_losses)
    # weights: Adam divides by sqrt(v), so float-order noise in near-zero gradients moves some
    # entries by up to ~1e-5 of the ~1e-2 each weight travels in 6 steps of lr 3e-3
    state = torch.load(two_process / run / "final_state.pt")
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-3, atol=1e-4)
    metrics = (two_process / run / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == STEPS  # one writer (rank 0): no duplicated lines


@pytest.mark.slow
@pytest.mark.parametrize("run", ["ddp_stopped", "fsdp_stopped"])
def test_two_process_checkpoint_resumes_in_one_process(two_process, reference, run, tmp_path):
    """The step-3 checkpoint of a 2-process run (full, unsharded tensors) resumes with 1 process
    and finishes on the uninterrupted 1-process curve."""
    ref_losses, ref_state = reference
    assert len(_results(two_process)[run]) == STOP_AT
    out = tmp_path / run
    shutil.copytree(two_process / run, out)
    trainer, tasks = make_trainer("none", str(out))
    losses = fit(trainer, tasks, resume=True)
    assert trainer.step == STEPS
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-7)
    for name, value in generator_state(trainer).items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_checkpoint_holds_full_tensors(two_process, reference):
    """FSDP shards parameters across ranks; the checkpoint must still hold their full shapes."""
    from funcmem.io import read_safetensors

    tensors = read_safetensors(two_process / "fsdp" / CHECKPOINT_NAME)
    for name, value in reference[1].items():
        assert tensors[f"model.{name}"].shape == value.shape
        assert tensors[f"optim.{name}.exp_avg"].shape == value.shape


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
