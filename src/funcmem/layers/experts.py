"""LoRA per expert on stacked expert weights (E, out, in), through the module's own forward."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.func import functional_call

from .base import LoRALayer
from .routing import Routing, tiles


class ExpertsLoRA(LoRALayer):
    """LoRA per expert on stacked expert weights (E, out, in) of any module.

    The module's own forward runs with ``W + scale * B_e A_e`` swapped in (``functional_call``);
    with several LoRAs in a batch it runs once per distinct LoRA on that LoRA's samples (tensor
    arguments whose first dimension is the batch are split, the output is stitched back).

    ``flattened_tokens`` says how the module's first input dimension meets the LoRA's samples:

    - False: it is the sample batch b (a multiple of the LoRA's samples means CFG copies, as
      for every other wrapper: sample i uses ``i % n``);
    - True: it is the samples' tokens flattened sample-major, (m * T, ...), as Hugging Face MoE
      blocks call their experts (``hidden_states.view(-1, d)``): row j belongs to sample ``j // T``
      of the m samples the LoRA describes (CFG copies then need an ``index`` of length m);
    - None (default): True when the module's forward takes ``top_k_index`` (the ``transformers``
      experts interface), else False.
    """

    flattened_tokens: bool | None = None

    def _flattened(self) -> bool:
        if self.flattened_tokens is not None:
            return self.flattened_tokens
        if "_takes_top_k" not in self.__dict__:  # read the signature once
            self._takes_top_k = "top_k_index" in inspect.signature(type(self.base_layer).forward).parameters
        return self._takes_top_k

    def weight_delta(self, name, a, b, scale):
        return scale * (b @ a)  # (E, out, r) @ (E, r, in)

    def _weights(self, j: int) -> dict[str, Tensor]:
        return {name: self.base_layer.get_parameter(name) + self.weight_delta(name, m.a[j], m.b[j], m.scale).to(
            self.base_layer.get_parameter(name).dtype) for name, m in self.factors.items()}

    def forward(self, *args, **kwargs):
        if not self.factors:
            return self.base_layer(*args, **kwargs)
        routing = next(iter(self.factors.values())).routing
        batch = args[0].shape[0]
        tokens = tiles(routing.samples, batch, "experts")
        if self._flattened() and tokens > 1 and routing.rows > 1:  # row j is token j % T of sample j // T
            rows = routing.sample_rows(routing.samples, args[0].device).repeat_interleave(tokens)
            routing = Routing(routing.rows, rows)
        if routing.rows == 1:
            return functional_call(self.base_layer, self._weights(0), args, kwargs)
        groups, out = routing.groups(batch, args[0].device), None
        self.last_path = "segmented"
        for row, s, e in zip(groups.rows, groups.bounds[:-1], groups.bounds[1:]):
            rows = torch.arange(s, e, device=args[0].device) if groups.order is None else groups.order[s:e]
            pick = lambda v: v[rows] if isinstance(v, Tensor) and v.dim() and v.shape[0] == batch else v
            part = functional_call(self.base_layer, self._weights(row), tuple(map(pick, args)),
                                   {key: pick(v) for key, v in kwargs.items()})
            out = part.new_empty(batch, *part.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, part)
        return out
