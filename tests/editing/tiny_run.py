"""A tiny, untrained run directory in seconds, for the run-directory and service tests.

The same files ``rundir.save_run`` writes for ``funcmem demo``, from randomly initialised methods; the editor's
zero-initialised head and the generator's zero B head are filled with small random values, so
every instruction gives a different, non-trivial LoRA and output (a fresh run would be the identity).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch

from funcmem.editing.benchmark.config import BenchmarkConfig
from funcmem.editing.benchmark.training import make_memory
from funcmem.editing.conditions import MiniLMEfficientNet
from funcmem.editing.editor import Editor, EditorConfig
from funcmem.editing.methods import Bank, Shared
from funcmem.editing.ops import EDITS
from funcmem.editing.rundir import save_run


def make_tiny_run(out: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Write the run to ``out``; ``full_size``: the sizes of ``funcmem demo --quick`` (for timing)."""
    torch.manual_seed(seed)
    cfg = BenchmarkConfig.quick() if full_size else BenchmarkConfig.quick(
        editor={"width": 32, "depth": 2, "heads": 2}, rank=2, alpha=2.0,
        generator={"d_model": 32, "depth": 1, "head_dim": 16, "token_dim": 32, "dim_accumulation": 2})
    editor = Editor(EditorConfig.from_dict(cfg.editor))
    with torch.no_grad():  # zero-initialised weights (the head, adaLN-Zero gates) made random: a non-identity editor
        for p in editor.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    editor.requires_grad_(False).eval()
    # the default condition encoder's stream widths, without loading its models
    dims = MiniLMEfficientNet(SimpleNamespace(dim=384), SimpleNamespace(dim=1280)).raw_dims
    memory = make_memory(editor, {k: torch.randn(8, 4, d) for k, d in dims.items()}, dims, cfg, seed)
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(0, 0.5)
    methods = {"functional_memory": memory, "shared_lora": Shared(editor, cfg.targets, cfg.rank, cfg.alpha),
               "shared_lora_matched": Shared(editor, cfg.targets, cfg.rank * 2, cfg.alpha),
               "per_task_lora": Bank(editor, cfg.targets, cfg.rank, cfg.alpha, len(EDITS))}
    methods["per_task_lora"].keys = torch.randn(len(EDITS), 4)
    save_run(out, asdict(cfg), editor, methods)
    return out
