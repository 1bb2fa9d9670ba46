"""``funcmem bench threads``: training steps/s under each thread policy, with and without a busy
neighbour (a ``while True: pass`` process per ``--burners``), each policy in a fresh process so
that OpenMP's environment is read as it would be at start-up. The workload is the toy's training
step (``funcmem.toy``: a generator of LoRA for a small MLP), the same in every run.

Policies: PyTorch's default (one thread per core, spinning while it waits), one thread, the
CLI's choice (``funcmem.threads.choose_threads``), and every core with ``OMP_WAIT_POLICY=PASSIVE``
set before torch loads. The figures are ratios to the default in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ..io import write_json
from ..threads import available_cpus, choose_threads

CHILD = """
import json, sys, time, torch
from funcmem import FunctionalMemory, GeneratorConfig
from funcmem.toy import ConflictingTasks, ToyMLP
threads, seconds = int(sys.argv[1]), float(sys.argv[2])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
base = ToyMLP(32)
tasks = ConflictingTasks(base)
fm = FunctionalMemory(base, ["fc1", "fc2"], rank=4, condition_dim=16,
                      generator=GeneratorConfig(d_model=32, depth=1, head_dim=16, token_dim=32))
opt = torch.optim.AdamW(fm.trainable_parameters(), 3e-3)
def step(i):
    c, x, y, _ = tasks.batch(i)
    loss = ((fm(c, x) - y) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
step(0)
n, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds or n < 3:
    step(n)
    n += 1
print(json.dumps({"threads": torch.get_num_threads(), "steps_per_s": n / (time.perf_counter() - start)}))
"""


def policies() -> dict[str, tuple[int, dict]]:
    """name -> (threads for torch.set_num_threads, 0 = torch's default; extra environment)."""
    cpus = available_cpus()
    return {"default": (0, {}), "one": (1, {}), "cli_choice": (choose_threads()[0], {}),
            "all_passive": (cpus, {"OMP_WAIT_POLICY": "PASSIVE"})}


def measure(threads: int, env: dict, seconds: float) -> dict:
    """One policy in a fresh process: {"threads", "steps_per_s"}."""
    environ = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(seconds)], capture_output=True, text=True,
                         env={**environ, **env}, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(seconds: float = 10.0, burners: int = 1, out: str | Path = "runs/bench/threads.json") -> dict:
    """Every policy beside 0..``burners`` busy processes; written to ``out`` as JSON."""
    if burners < 0 or not seconds > 0:
        raise ValueError(f"need --seconds > 0 and --burners >= 0, got {seconds} and {burners}")
    result = {"cpus": available_cpus(), "seconds_per_run": seconds, "runs": {}}
    for busy in range(burners + 1):
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(1.0 if busy else 0.0)
            load = os.getloadavg()[0]
            rows = {name: measure(threads, env, seconds) for name, (threads, env) in policies().items()}
        finally:
            for p in procs:
                p.kill()
                p.wait()
        for row in rows.values():
            row["over_default"] = row["steps_per_s"] / rows["default"]["steps_per_s"]
        result["runs"][f"burners_{busy}"] = {"load_before": load, "policies": rows}
    write_json(out, result)
    return result


def format_table(result: dict) -> str:
    lines = [f"toy training steps/s on {result['cpus']} cpus ({result['seconds_per_run']:.0f} s per run)"]
    for name, run_ in result["runs"].items():
        lines.append(f"{name} (load {run_['load_before']:.2f} before):")
        for policy, row in run_["policies"].items():
            lines.append(f"  {policy:12s} threads {row['threads']:2d}  {row['steps_per_s']:8.2f} steps/s  "
                         f"{row['over_default']:6.1f}x the default")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem bench threads``'s options."""
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per policy and load")
    parser.add_argument("--burners", type=int, default=1, help="also measure beside 1..N busy processes")
    parser.add_argument("--out", default="runs/bench/threads.json")


def run_cli(args: argparse.Namespace) -> int:
    result = run(args.seconds, args.burners, args.out)
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0
