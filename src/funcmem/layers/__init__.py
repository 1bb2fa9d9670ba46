"""LoRA wrappers, one file per idea:

    routing.py   which path applies a mounted LoRA (cost model; the thread-local forced path)
    base.py      ``LoRALayer``: the wrapper that keeps ``base_layer`` and adds the update
    linear.py    ``LinearLoRA``   (nn.Linear)
    conv.py      ``Conv2dLoRA``   (nn.Conv2d, groups 1)
    experts.py   ``ExpertsLoRA``  (stacked expert weights (E, out, in))

``funcmem.mount`` wraps a model's targets with them and mounts LoRAs.
"""

from .base import LoRALayer, Mounted, WeightedLoRALayer
from .conv import Conv2dLoRA
from .experts import ExpertsLoRA
from .linear import LinearLoRA
from .routing import PATHS, Groups, Routing, choose_path, current_path, lora_path, set_lora_path

WRAPPERS = {"linear": LinearLoRA, "conv2d": Conv2dLoRA, "experts": ExpertsLoRA}

__all__ = ["LoRALayer", "Mounted", "WeightedLoRALayer", "LinearLoRA", "Conv2dLoRA", "ExpertsLoRA", "WRAPPERS",
           "PATHS", "Groups", "Routing", "choose_path", "current_path", "lora_path", "set_lora_path"]
