"""The benchmark's settings: everything a run depends on, saved as the run's ``config.json``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...generator import GeneratorConfig
from ..editor import EditorConfig
from ..ops import FAMILY


BASE_INSTRUCTIONS = ("instruction", "neutral")
"""What the frozen base reads: the sample's instruction, or ``NEUTRAL`` for every sample (the ablation in
which everything instance-specific reaches the base through the adapter; the condition encoders still
read the instruction)."""


@dataclass
class BenchmarkConfig:
    """Everything a run depends on (saved as ``config.json`` in the run directory)."""

    size: int = 32
    train_examples: int = 3072
    test_examples: int = 384  # per evaluation split (``tasks.EVAL_SPLITS``)
    steps: int = 1200
    batch: int = 16
    rank: int = 4
    alpha: float = 4.0
    lr_lora: float = 3e-3
    lr_generator: float = 1e-3  # below the LoRA's: a faster generator collapsed in a feasibility study
    condition_dim: int = 64
    # A LoRA basis of one per edit, and a warm start from the trained bank (docs/fit.md): with
    # both, the label-told generator fits as the bank does (without, 2 dB below it).
    generator: dict = field(default_factory=lambda: GeneratorConfig(d_model=96, depth=2, head_dim=16, token_dim=64,
                                                                     dim_accumulation=4, basis=len(FAMILY)).to_dict())
    targets: list = field(default_factory=lambda: ["img_attn.qkv", "img_attn.proj", "img_mlp.fc1", "img_mlp.fc2"])
    # the full run's rows: the condition from the instruction and photo, the same generator told the edit
    # (fit vs understanding) and told the edit and its value (an oracle for values no bank can list);
    # --condition encoders,base-hidden adds the editor's own tokens
    conditions: list = field(default_factory=lambda: ["encoders", "label", "label-value"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    warm_start: list = field(default_factory=lambda: ["encoders", "base-hidden", "label", "label-value"])  # start from the bank
    warm_start_steps: int = 500
    warm_start_lr: float = 1e-2
    scaling_depths: list = field(default_factory=lambda: [1, 2, 4])
    scaling_ranks: list = field(default_factory=lambda: [2, 4, 8])
    conflict_samples: int = 48
    skip_methods: list = field(default_factory=list)  # rows of ``run.methods_table`` left out (the quick run's time)
    base_instruction: str = "instruction"  # or "neutral" (``BASE_INSTRUCTIONS``)
    editor: dict = field(default_factory=lambda: EditorConfig().to_dict())
    editor_steps: int = 1500
    images: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    data_seed: int = 0

    def __post_init__(self):
        if self.base_instruction not in BASE_INSTRUCTIONS:
            raise ValueError(f"base_instruction must be one of {BASE_INSTRUCTIONS}, got {self.base_instruction!r}")

    @classmethod
    def quick(cls, **overrides) -> "BenchmarkConfig":
        """The quick run: two seeds (margins against their spread), smaller test splits; no scaling sweep,
        no matched shared LoRA and no told generators (the full run has them all; ``--condition
        encoders,label,label-value`` adds the generator told the edit and the one told edit and value, the
        oracle of values no bank is told: a few minutes each). The warm start keeps the full run's 500
        steps although it is two thirds of the generator's time: fewer cost seen wording (2 seeds: 250
        steps 24.98 dB, 500 steps 25.57-25.74), and the second seed trains beside the first when a core
        is free (``run.train_methods``)."""
        base = dict(train_examples=2048, test_examples=192, steps=500, conditions=["encoders"], seeds=[0, 1],
                    scaling_depths=[], scaling_ranks=[], conflict_samples=32, editor_steps=1200,
                    skip_methods=["shared_lora_matched"])
        return cls(**{**base, **overrides})

    def generator_config(self, **changes) -> GeneratorConfig:
        return GeneratorConfig.from_dict({**self.generator, **changes})
