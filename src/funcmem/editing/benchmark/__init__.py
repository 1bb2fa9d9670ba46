"""The editing benchmark: every method on one frozen editor, the same data, steps and seeds.

    config.py     BenchmarkConfig: everything a run depends on
    sets.py       the photo split, the task splits; EditSet: examples with their frozen features
    training.py   one method trained with the shared settings; a fresh generator (make_memory)
    evaluate.py   PSNR / SSIM, means over seeds; ``funcmem eval``
    run.py        the table of methods and the run (``funcmem demo`` calls it)
    analysis.py   routing, gradient conflict, manifold, probes, latency, the samples of edits.png
    findings.py   the report's sentences, computed from the numbers (margins against the seeds' spread)
    report.py     pictures and report.md
    full_photos.py  full_photos.png: one whole test photo before / after every edit (``funcmem edit``'s path)
    cli.py        ``funcmem demo`` and the flags it shares with ``funcmem continual``
"""

from .config import BenchmarkConfig
from .run import run

__all__ = ["BenchmarkConfig", "run"]
