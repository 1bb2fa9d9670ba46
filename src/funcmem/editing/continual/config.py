"""A continual run's settings: the edit groups, the replay store and the removal fine-tune; every
stage trains with the benchmark's settings, held by composition (``ContinualConfig.benchmark``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..benchmark.config import BenchmarkConfig
from ..ops import FAMILY

METHODS = ("shared_lora_sequential", "per_task_lora", "fm_naive", "fm_replay")
GROUPS = {"A": ["saturate", "desaturate", "add_noise", "denoise"],  # the benchmark's family (``ops.FAMILY``),
          "B": ["age", "restore", "brighten", "darken"],  # inverse pairs in the same stage
          "C": ["contrast_up", "contrast_down", "warmer", "cooler", "tint"]}
CONDITION = "encoders"  # the benchmark's default condition: MiniLM + EfficientNet-Lite0 streams
EDIT_NAMES = list(FAMILY)  # edit ids index this list in every stage (the family: ``tasks.EDIT_NAMES``' first ids)
FORGET_NEAR = {"recombine": True, "noise": 3.0}  # the ablation behind both: docs/continual.md
FORGET_GATE = {"probes": 8, "temperature": 0.02, "text": ""}  # ``behaviour.BehaviourGate``; empty: off
STAGE_DEFAULTS = {"full": dict(steps=600, conditions=[CONDITION], seeds=[0]),
                  "quick": dict(steps=200, conditions=[CONDITION], seeds=[0])}


@dataclass
class ContinualConfig:
    """Everything a continual run depends on (saved in ``continual.json``).

    Args:
        groups: stage name -> the edits it teaches, in training order.
        train_per_group, test_per_group: examples per stage (balanced over its edits).
        store_per_edit: training instances per edit whose condition vectors ``fm_replay`` stores.
        distill_weight: weight of the functional-distillation term (relative to the image MSE).
        replay_batch: stored conditions per step (distillation and forgetting).
        forget_steps, forget_lr: the removal fine-tune (stored conditions only).
        relearn_steps: the undo's fine-tune (``relearn_psnr``, measured on a copy).
        forget_near: ``funcmem.distill.Neighbourhood`` settings (all but ``label_positions``): the
            conditions near the stored ones that the removal also covers; empty: the stored ones only.
        forget_gate: the behaviour gate's settings (``behaviour.BehaviourGate``: ``probes`` images,
            ``temperature``, the editor's neutral ``text``); a drawn kept-side condition whose update
            behaves like a removed edit loses that share of it. Empty: off.
        benchmark: the settings of every stage's training (``steps`` is per stage and method; the
            first of ``seeds`` is the run's seed; its example counts are not used).
    """

    groups: dict = field(default_factory=lambda: {k: list(v) for k, v in GROUPS.items()})
    train_per_group: int = 1536
    test_per_group: int = 192
    store_per_edit: int = 8
    distill_weight: float = 1.0
    replay_batch: int = 16
    forget_steps: int = 600
    forget_lr: float = 1e-3
    relearn_steps: int = 300
    forget_near: dict = field(default_factory=lambda: dict(FORGET_NEAR))
    forget_gate: dict = field(default_factory=lambda: dict(FORGET_GATE))
    benchmark: BenchmarkConfig = field(default_factory=lambda: BenchmarkConfig(**STAGE_DEFAULTS["full"]))

    @classmethod
    def quick(cls, benchmark: BenchmarkConfig | None = None, **overrides) -> "ContinualConfig":
        """About 6 minutes on 2 CPU cores (the base editor cached; it is the quick demo's); ``--forget`` adds
        about 4 minutes (600 removal steps with the behaviour gate, and the 150-step undo)."""
        base = dict(train_per_group=384, test_per_group=96, replay_batch=8, forget_steps=600, relearn_steps=150)
        return cls(**{**base, **overrides},
                   benchmark=benchmark or BenchmarkConfig.quick(**STAGE_DEFAULTS["quick"]))

    @property
    def seed(self) -> int:
        return self.benchmark.seeds[0]

    @property
    def condition(self) -> str:
        """The generator's condition (the benchmark's first)."""
        return self.benchmark.conditions[0]
