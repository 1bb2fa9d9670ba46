"""funcmem: functional memory — a generator of per-instance LoRA for a frozen base model.

Public API::

    fm = funcmem.FunctionalMemory(base, targets=[...], rank=8, alpha=16, condition_dim=384,
                                  generator=funcmem.GeneratorConfig(d_model=128, depth=2, head_dim=32))
    lora = fm.generate(condition)         # (B, L, condition_dim) -> per-sample LoRA
    with fm.mounted(lora):
        y = base(x)
    y = fm(condition, x)
"""

from . import diffusers_io, distill, hywu, io, peft_io, train
from .generator import GeneratorConfig, ParameterGenerator
from .lora import LoRA
from .bank import LoRABank, SharedLoRA
from .memory import FunctionalMemory
from .targets import Target, resolve_targets
from .tokens import TokenLayout
from .version import __version__

__all__ = ["FunctionalMemory", "LoRABank", "SharedLoRA", "GeneratorConfig", "ParameterGenerator", "LoRA", "Target",
           "TokenLayout", "resolve_targets", "diffusers_io", "distill", "hywu", "io", "peft_io", "train", "__version__"]
