"""Continual learning: teach a trained generator new edits, one group after another, without
forgetting the old ones; and remove edits again (``funcmem continual``).

    config.py     ContinualConfig (the benchmark's settings by composition), groups, methods
    learners.py   the methods as learners: sequential shared LoRA, LoRA per stage, generator
                  fine-tuned naively or with functional distillation (``funcmem.distill``)
    protocol.py   stages, the stage x group matrices, summaries, the removal's test sets, the run
    removal.py    removing edits (``--forget``): the neighbourhood, near misses, metrics, the undo
    behaviour.py  the removal's behaviour gate: what an update does to procedural probe images
    report.py     continual.png and continual.md
    cli.py        ``funcmem continual``
"""

from .config import EDIT_NAMES, GROUPS, METHODS, ContinualConfig
from .protocol import run, summarize

__all__ = ["EDIT_NAMES", "GROUPS", "METHODS", "ContinualConfig", "run", "summarize"]
