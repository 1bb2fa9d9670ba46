"""Mounting LoRA factors on a frozen base: wrappers that keep ``base_layer`` and add the update.

Inside ``mounted(...)`` every target computes ``base_layer(x) + scale * B_i (A_i x)`` with sample
i's own factors. The LoRA batch n and the input batch b relate as:

- n == b: sample i uses factors i;
- n divides b: sample i uses factors ``i % n`` (the way ``torch.cat([x, x])`` builds
  classifier-free-guidance copies), without repeating the factors in memory; n == 1 broadcasts;
- the LoRA has an ``index`` (m,) with m == b (or m dividing b, tiled the same way): sample i
  uses factor row ``index[i]``;
- anything else is an error naming both sizes.

Outside ``mounted(...)`` a wrapper returns exactly ``base_layer(x)``.

How the update is applied (every path gives the same result; ``set_lora_path`` forces one; the
wrappers and the path choice live in ``funcmem.layers``):

- ``plain`` (one factor row for the whole batch): ``y += s (x A^T) B^T``, two matmuls.
- ``per_sample`` (n == b, or an index whose rows rarely repeat): shrink ``h = bmm(x, A^T)``
  (b, T, r), then expand fused into the output, ``baddbmm(y, h, B^T)``; with an index the
  factor rows are gathered (``A[index]``: rows, never dense weights).
- ``tiled`` (n divides b: CFG copies, no index): the per-sample kernel once per copy, on views of
  the input and output: factors are not repeated, the input is not copied.
- ``segmented`` (an index whose rows repeat): samples grouped by factor row (SGMV-style), each row
  applied once to its group as ``plain``; groups are slices of the batch when a row's samples are
  contiguous, else one gathered copy. ``auto`` weighs it against ``per_sample`` with a small cost
  model (``layers.routing.choose_path``).

No path loops over samples in Python (``segmented`` loops over distinct LoRAs, ``tiled`` over
copies) or materialises a per-sample dense weight. The auto choice
between ``per_sample`` and ``segmented`` reads the index on the host once per mounted LoRA and
batch size (shared by all targets); under ``torch.compile`` it takes ``per_sample`` without
reading it, so compiled graphs have no data-dependent branch. When no gradient is recorded the
update is added into the base layer's fresh output in place (no second output-sized tensor);
with autograd every op is out of place.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from .layers import WRAPPERS, LoRALayer, Mounted, Routing
from .layers.routing import PATHS, current_path, lora_path, set_lora_path
from .lora import LoRA
from .targets import Target

__all__ = ["inject", "mounted", "merge", "unmerge", "PATHS", "current_path", "lora_path", "set_lora_path"]


def inject(model: nn.Module, targets: list[Target]) -> dict[str, tuple[LoRALayer, str]]:
    """Wrap every target's module (once; existing funcmem wrappers are reused).

    Returns: target name -> (wrapper, weight name inside ``wrapper.base_layer``).
    """
    handles = {}
    for t in targets:
        module = model.get_submodule(t.owner)
        if not isinstance(module, LoRALayer):
            parent_name, _, child = t.owner.rpartition(".")
            module = WRAPPERS[t.kind](module)
            setattr(model.get_submodule(parent_name), child, module)
        handles[t.name] = (module, t.weight_name)
    return handles


@contextmanager
def mounted(handles: dict[str, tuple[LoRALayer, str]], lora: LoRA):
    """Mount ``lora`` on the wrapped targets for the duration of the block (see the module doc
    for how its batch meets the input batch)."""
    missing = [name for name in handles if name not in lora.factors]
    if missing:
        raise KeyError(f"the LoRA has no factors for targets {missing[:5]}")
    busy = [name for name, (w, weight) in handles.items() if weight in w.factors]
    if busy:
        raise RuntimeError(f"a LoRA is already mounted on {busy[:3]}; leave that block first")
    routing = Routing(lora.batch_size, lora.index)  # one per LoRA: its grouping is computed once
    try:
        for name, (wrapper, weight) in handles.items():
            a, b = lora.factors[name]
            wrapper.factors[weight] = Mounted(a, b, lora.scale, routing)
        yield
    finally:
        for wrapper, weight in handles.values():
            wrapper.factors.pop(weight, None)


def merge(handles: dict[str, tuple[LoRALayer, str]], lora: LoRA) -> None:
    """Fold one sample's factors into the base weights (see ``unmerge``)."""
    if lora.batch_size != 1:
        raise ValueError(f"merge takes the LoRA of one sample (batch 1), got batch {lora.batch_size}; use lora[i]")
    for name, (wrapper, weight) in handles.items():
        a, b = lora.factors[name]
        wrapper.merge(weight, a.detach(), b.detach(), lora.scale)


def unmerge(handles: dict[str, tuple[LoRALayer, str]]) -> None:
    for wrapper, _ in handles.values():
        wrapper.unmerge()
