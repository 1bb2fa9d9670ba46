"""A training run killed with SIGKILL at random points (and once in the middle of writing a
checkpoint) resumes from its last checkpoint: no error, every step logged exactly once, at most a
checkpoint interval of work redone, and the same final weights and loss as an uninterrupted run."""

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import funcmem
from funcmem.toy import ConflictingTasks, ToyMLP
from funcmem.train import Trainer, TrainConfig

STEPS, EVERY = 40, 4
GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=16, token_dim=32)


def build(out_dir):
    torch.manual_seed(0)
    base = ToyMLP(32)
    tasks = ConflictingTasks(base)
    fm = funcmem.FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16, generator=GEN)

    def loss(m, batch):
        cond, x, y, _ = batch
        return ((m(cond, x) - y) ** 2).mean()

    cfg = TrainConfig(steps=STEPS, lr=3e-3, warmup_steps=5, checkpoint_every=EVERY, log_every=1, progress=False,
                      out_dir=str(out_dir), distributed="none")
    return Trainer(fm, loss, cfg), tasks


def job(out_dir, conn, stall_at=None):
    """The training process: reports every step on ``conn``; optionally stalls mid-checkpoint."""
    torch.set_num_threads(1)
    trainer, tasks = build(out_dir)
    if stall_at is not None:
        import funcmem.train as train_module
        from funcmem.io import atomic_write

        real = train_module.write_safetensors

        def stalling(path, tensors, metadata=None):
            if trainer.step != stall_at:
                return real(path, tensors, metadata)

            def half(tmp):
                with open(tmp, "wb") as f:
                    f.write(b"\0" * 4096)  # a partial file under the temporary name
                    f.flush()
                conn.send("stalled")
                time.sleep(120)

            atomic_write(path, half)

        train_module.write_safetensors = stalling
    trainer.fit(tasks.batch, resume=True, callback=lambda t: conn.send(t.step))
    conn.send("done")


def run_until(out_dir, kill_after=None, stall_at=None, delay=0.0):
    """Start the job; SIGKILL it once it reports step ``kill_after`` (or stalls). Returns
    (first step it reported: where it resumed, last step it reported, finished)."""
    ctx = multiprocessing.get_context("fork")  # the test process has torch imported already: starts in ms
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=job, args=(out_dir, child, stall_at))
    proc.start()
    first = last = None
    finished = False
    try:
        while True:
            if not parent.poll(60):
                raise TimeoutError("the training process stopped reporting")
            msg = parent.recv()
            if msg == "done":
                finished = True
                break
            if msg == "stalled":
                break
            first = msg if first is None else first
            last = msg
            if kill_after is not None and msg >= kill_after:
                time.sleep(delay)  # land the kill at a random point of the next step
                break
    finally:
        if not finished:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
    if not finished:
        assert proc.exitcode == -signal.SIGKILL
    else:
        assert proc.exitcode == 0
    return first, last, finished


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(tmp_path, one_thread):
    straight, tasks = build(tmp_path / "straight")  # first: forked children then find AdamW etc. imported
    straight.fit(tasks.batch)
    rng = random.Random(1234)
    kills = sorted(rng.sample(range(2, STEPS - 2), 6))  # 6 random kill points
    stall_at = rng.choice([s for s in range(EVERY * 2, STEPS, EVERY) if all(abs(s - k) > EVERY for k in kills)])
    out = tmp_path / "killed"
    log = []
    last_reported = 0
    plan = [(k, None) for k in kills if k < stall_at] + [(None, stall_at)] + [(k, None) for k in kills if k > stall_at]
    for kill_after, stall in plan:
        first, last, finished = run_until(out, kill_after, stall, delay=rng.uniform(0, 0.02))
        assert not finished
        # resumed at a checkpoint, at most one interval behind what the killed run had reported
        assert first % EVERY == 0 and first >= (last_reported // EVERY) * EVERY, (first, last_reported)
        log.append((kill_after, stall, first, last))
        last_reported = last if last is not None else first
        if stall is not None:
            assert last == stall - 1  # it finished step `stall`, then died writing its checkpoint
    first, last, finished = run_until(out)
    assert finished and last == STEPS and first >= (last_reported // EVERY) * EVERY
    assert log[[s for _, s, _, _ in log].index(stall_at) + 1][2] == stall_at - EVERY  # the half write was not used

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # nothing lost, nothing repeated

    assert rows[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=1e-4)
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in straight.history], rel=1e-4)
    resumed, _ = build(out)
    assert resumed.load_checkpoint() and resumed.step == STEPS
    for (p, name), q in zip(resumed.names.items(), straight.names):
        torch.testing.assert_close(p, q, msg=name)
