"""The wrapper around one base module: it keeps ``base_layer`` and adds the mounted update.

A wrapper computes ``y = base_layer(x)`` and, while a LoRA is mounted (``factors`` holds it),
adds ``scale * B_i (A_i x)`` for sample i through the path ``routing.choose_path`` picks. Outside
``mounted(...)`` it returns exactly ``base_layer(x)``. Its ``state_dict`` keys are the base's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .routing import Groups, Routing, choose_path


@dataclass
class Mounted:
    """What a wrapper holds for one weight while a LoRA is mounted."""

    a: Tensor
    b: Tensor
    scale: float
    routing: Routing


class LoRALayer(nn.Module):
    """A wrapper around one base module; ``factors`` maps a weight name to its mounted factors.

    Single-weight subclasses implement two kernels, both adding the update to the base output y:
    ``_plain`` (one factor row for the whole input) and ``_per_sample`` (n rows, sample i uses row
    i % n); ``_add_lora`` picks the path and builds the grouped ones from them. ``last_path`` records
    the path of the last call (outside ``torch.compile``).
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.factors: dict[str, Mounted] = {}
        self._merged: dict[str, Tensor] = {}  # original weights while merged
        self.last_path: str | None = None
        # state_dict keys stay the base's own (no ``base_layer.``): wrapped and plain bases load each other
        self.register_state_dict_post_hook(_hide_base_layer)
        self.register_load_state_dict_pre_hook(_expose_base_layer)

    def weight_delta(self, name: str, a: Tensor, b: Tensor, scale: float) -> Tensor:
        """``scale * B @ A`` of one sample, shaped like the base weight."""
        raise NotImplementedError

    def merge(self, name: str, a: Tensor, b: Tensor, scale: float) -> None:
        """Fold one sample's factors (batch 1) into the base weight."""
        weight = self.base_layer.get_parameter(name)
        if name in self._merged:
            raise RuntimeError("already merged: unmerge() first")
        self._merged[name] = weight.detach().clone()
        with torch.no_grad():
            weight += self.weight_delta(name, a[0], b[0], scale).to(weight.dtype)

    def unmerge(self) -> None:
        """Restore the weights saved at merge, bit for bit."""
        with torch.no_grad():
            for name, original in self._merged.items():
                self.base_layer.get_parameter(name).copy_(original)
        self._merged.clear()

    # ---- application: y = base_layer(x) is computed; the kernels add the update to it

    def _plain(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, scale: float, inplace: bool) -> Tensor:
        """One factor row, a (r, in) and b (out, r), for every sample of x."""
        raise NotImplementedError

    def _per_sample(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, scale: float, inplace: bool) -> Tensor:
        """a (n, r, in), b (n, out, r) with n dividing x's batch: sample i uses row i % n."""
        raise NotImplementedError

    def _inplace(self, y: Tensor, *tensors: Tensor) -> bool:
        """Add into the base output y in place: only when no gradient is recorded and y is the
        stock layer's fresh, contiguous tensor (saves an output-sized allocation and pass)."""
        stock = type(self.base_layer).forward in (nn.Linear.forward, nn.Conv2d.forward)
        hooked = self.base_layer._forward_hooks or self.base_layer._forward_pre_hooks
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (y, *tensors))
        return stock and not hooked and not grad and y.is_contiguous()

    def _add_lora(self, x: Tensor, y: Tensor, m: Mounted) -> Tensor:
        batch = x.shape[0]
        factor_elements = m.a[0].numel() + m.b[0].numel()  # r (in + out)
        path = choose_path(m.routing, batch, factor_elements, x[0].numel() + y[0].numel(), x.device,
                           type(self).__name__)
        if not torch.compiler.is_compiling():
            self.last_path = path
        a, b = m.a.to(x.dtype), m.b.to(x.dtype)
        inplace = self._inplace(y, x, a, b)
        if path == "plain":
            return self._plain(x, y, a[0], b[0], m.scale, inplace)
        if path == "per_sample" and (m.routing.index is not None or a.shape[0] != batch):
            rows = m.routing.sample_rows(batch, x.device)
            a, b = a[rows], b[rows]  # (b, r, in), (b, out, r): factor rows, not dense weights
        if path in ("per_sample", "tiled"):
            return self._per_sample(x, y, a, b, m.scale, inplace)
        return self._segmented(x, y, a, b, m.scale, m.routing.groups(batch, x.device), inplace)

    def _segmented(self, x: Tensor, y: Tensor, a: Tensor, b: Tensor, scale: float, g: Groups,
                   inplace: bool) -> Tensor:
        """Each factor row once, on its group of samples (SGMV-style): slices of the batch, or of
        one gathered copy when a row's samples are not contiguous."""
        xs, ys = (x, y) if g.order is None else (x[g.order], y[g.order])
        spans = list(zip(g.rows, g.bounds[:-1], g.bounds[1:]))
        if inplace:  # each group's update lands in its slice of ys
            for row, s, e in spans:
                self._plain(xs[s:e], ys[s:e], a[row], b[row], scale, True)
            return y if g.order is None else y.index_copy_(0, g.order, ys)
        parts = [self._plain(xs[s:e], ys[s:e], a[row], b[row], scale, False) for row, s, e in spans]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if g.order is None else out.index_copy(0, g.order, out)


class WeightedLoRALayer(LoRALayer):
    """Wrappers of layers with one ``weight``: expose it (and ``bias``) as PEFT's layers do."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


def _hide_base_layer(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _expose_base_layer(module, state_dict, prefix, *args) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)
