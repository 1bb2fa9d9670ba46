"""How many CPU threads PyTorch uses: a default that stays fast on a busy machine.

PyTorch starts one intra-op thread per core, and its OpenMP threads spin while they wait for each
other. When another process holds one of those cores, every parallel region waits for the thread
that lost it. Measured on the shared 2-core machine (load 5-9 from other jobs, plus 0 or 1
``while True: pass`` burner), steps/s, median (range) of 2-3 runs, of the quick demo's generator
training step (batch 16) and of the toy's:

    threads                                      generator, +0 / +1 burner    toy, +0 / +1 burner
    2 (PyTorch's default)                        0.07 (0.04-0.11) / 0.05      0.40 / 0.37
    1                                            0.86 (0.63-1.43) / 0.41      8.8 / 4.3
    2, OMP_WAIT_POLICY=PASSIVE before torch      1.51 (0.73-2.07) / 1.28      8.6 / 7.2
    2, OMP_WAIT_POLICY set after ``import torch``  0.06 / 0.04 (no effect: read when torch loads)

``funcmem``'s commands therefore choose the thread count themselves (``configure_threads``): half
of the free cores (the cores this process may use minus the 1-minute load average), at least 1
and at most ``MAX_AUTO_THREADS``, so a machine that gets busier later still has room. That is 1
on a 2-core machine, idle or not. ``--threads N`` or ``OMP_NUM_THREADS`` decide instead. The
library itself never changes torch's threads; a script calls ``configure_threads()`` for the same
choice::

    import funcmem.threads
    funcmem.threads.configure_threads()   # prints "threads: 1 (2 cpus, load 1.30; ...)" to stderr

Passive waiting must be in the environment before ``import torch`` (``OMP_WAIT_POLICY=PASSIVE
funcmem --threads 2 ...`` from a shell); the command cannot set it, as importing funcmem imports torch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

MAX_AUTO_THREADS = 4  # funcmem's models are small; more threads mostly wait (unmeasured above 2 cores)


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def load_average() -> float:
    """Runnable processes averaged over the last minute (0 where the platform has no load average)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(requested: int | None = None, cpus: int | None = None, load: float | None = None) -> tuple[int, str]:
    """(threads, why): ``requested``, else ``OMP_NUM_THREADS``, else half the free cores in [1, MAX_AUTO_THREADS]."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads must be >= 1, got {requested}")
        return requested, "--threads"
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), "OMP_NUM_THREADS"
    cpus = available_cpus() if cpus is None else cpus
    load = load_average() if load is None else load
    free = max(0.0, cpus - load)
    threads = max(1, min(MAX_AUTO_THREADS, int(free // 2)))
    return threads, f"{cpus} cpus, load {load:.2f}"


def other_runnable() -> float:
    """Other processes runnable right now (``/proc/loadavg``'s running count less this one); the
    1-minute load average where there is no such file."""
    try:
        running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return load_average()
    return float(max(0, running - 1))


def choose_processes(limit: int, requested: int | None = None, cpus: int | None = None,
                     busy: float | None = None) -> tuple[int, str]:
    """(processes, why) for independent jobs run side by side, one thread each (the benchmark's seeds):
    ``requested``, else the free cores rounded to the nearest whole core, in [1, ``limit``].

    ``busy`` (default: the smaller of the 1-minute load average and the processes runnable now) counts
    the cores others use: the load average alone still counts a job that ended a minute ago, such as
    the install before ``make demo``. Processes do not have the threads' trap: a process that loses
    its core only slows itself, so when the machine gets busier later the work still advances at the
    machine's pace."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"processes must be >= 1, got {requested}")
        return min(requested, max(1, limit)), "--workers"
    cpus = available_cpus() if cpus is None else cpus
    busy = min(load_average(), other_runnable()) if busy is None else busy
    return max(1, min(limit, int(max(0.0, cpus - busy) + 0.5))), f"{cpus} cpus, {busy:.2f} busy"


def configure_threads(requested: int | None = None, stream: IO | None = None) -> int:
    """Set torch's intra-op threads as ``choose_threads`` says and print the choice as one line
    (to ``stream``, default stderr). Returns the thread count."""
    import torch

    threads, why = choose_threads(requested)
    torch.set_num_threads(threads)
    hint = "" if why == "--threads" else "; --threads N to change"
    print(f"threads: {threads} ({why}{hint})", file=sys.stderr if stream is None else stream, flush=True)
    return threads
