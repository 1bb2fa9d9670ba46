"""Progress in logs: a bar on a terminal, whole lines every ~10% (or 30 s) anywhere else."""

import io

import torch

from funcmem.progress import LineProgress, progress
from funcmem.train import Trainer, TrainConfig


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_100_step_loop_in_a_log_is_ten_whole_lines():
    log = io.StringIO()
    with progress(total=100, desc="train", stream=log) as bar:
        for step in range(100):
            bar.set_postfix(loss=f"{1 / (step + 1):.3g}")
            bar.update(1)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10
    assert [line.split()[1] for line in lines] == [f"{n}/100" for n in range(10, 101, 10)]
    assert lines[-1].startswith("train: 100/100 (100%)") and lines[-1].endswith("loss=0.01")


def test_iterating_prints_the_same_lines_and_a_short_loop_ends_with_its_count():
    log = io.StringIO()
    assert list(progress(range(100), desc="x", stream=log)) == list(range(100))
    assert len(log.getvalue().splitlines()) == 10
    log = io.StringIO()
    with progress(total=7, stream=log) as bar:
        for _ in range(3):
            bar.update(1)  # stopped early: close() still reports where it got to
    assert log.getvalue().splitlines()[-1].startswith("3/7 (43%)")


def test_a_slow_loop_prints_at_least_every_30_seconds():
    now = [0.0]
    log = io.StringIO()
    bar = LineProgress(total=1000, stream=log, clock=lambda: now[0])
    for _ in range(5):  # 5 of 1000 steps: never 10%, but 31 s apart
        now[0] += 31
        bar.update(1)
    assert len(log.getvalue().splitlines()) == 5
    assert "31s elapsed" in log.getvalue().splitlines()[0]


def test_a_terminal_gets_tqdm_and_disable_prints_nothing():
    from tqdm import tqdm

    bar = progress(total=3, stream=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    with progress(total=10, stream=log, disable=True) as bar:
        bar.update(10)
    assert log.getvalue() == ""


def test_the_trainer_logs_lines_when_stderr_is_not_a_terminal(capsys):
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(steps=50, warmup_steps=1, description="fit", distributed="none")
    Trainer(model, lambda m, b: m(b).pow(2).mean(), cfg).fit(lambda step: torch.randn(4, 2))
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("fit: ")]
    assert len(lines) == 10 and lines[-1].startswith("fit: 50/50 (100%)") and "loss=" in lines[-1]
