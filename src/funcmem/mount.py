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

How the update is applied (every path gives the same result; ``set_lora_path`` forces one):

- ``plain`` (one factor row for the whole batch): ``y += s (x A^T) B^T``, two matmuls.
- ``per_sample`` (n == b, or an index whose rows rarely repeat): shrink ``h = bmm(x, A^T)``
  (b, T, r), then expand fused into the output, ``baddbmm(y, h, B^T)``; with an index the
  factor rows are gathered (``A[index]``: rows, never dense weights).
- ``tiled`` (n divides b: CFG copies, no index): the per-sample kernel once per copy, on views of
  the input and output: factors are not repeated, the input is not copied.
- ``segmented`` (an index whose rows repeat): samples grouped by factor row (SGMV-style), each row
  applied once to its group as ``plain``; groups are slices of the batch when a row's samples are
  contiguous, else one gathered copy. ``auto`` weighs it against ``per_sample`` with a small cost
  model (``choose_path``).

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .lora import LoRA
from .targets import Target

PATHS = ("auto", "per_sample", "segmented")
# auto's cost model (``choose_path``), in tensor elements moved; fitted on CPU with ``funcmem bench``
GROUP_COST = 20_000  # fixed cost of applying one group on the segmented path (Python, op dispatch)
GATHER_COST = 60_000  # fixed cost of the per-sample path with an index (gathering rows, batched matmuls)
_path = "auto"


def set_lora_path(path: str) -> None:
    """How mounted LoRAs are applied from now on: ``"auto"`` (default), ``"per_sample"`` or ``"segmented"``.

    A forced path applies to every LoRA, whatever its batch: ``"per_sample"`` gathers one factor
    row per sample, ``"segmented"`` groups samples by factor row (slow with many distinct rows).
    Benchmarks and tests force paths; applications leave ``"auto"``.
    """
    global _path
    if path not in PATHS:
        raise ValueError(f"unknown LoRA path {path!r}; choose one of {PATHS}")
    _path = path


@contextmanager
def lora_path(path: str):
    """``set_lora_path`` for the duration of a block."""
    previous = _path
    set_lora_path(path)
    try:
        yield
    finally:
        set_lora_path(previous)


def tiles(lora_batch: int, input_batch: int, where: str) -> int:
    """How many times the LoRA batch repeats over the input batch (k with b = k * n)."""
    if input_batch % lora_batch:
        raise ValueError(f"{where}: LoRA batch {lora_batch} does not divide the input batch {input_batch} "
                         "(use one LoRA per sample, one for all, or a divisor for CFG-style copies)")
    return input_batch // lora_batch


@dataclass
class Groups:
    """Samples grouped by factor row: group g is sorted positions ``bounds[g]:bounds[g+1]``, row ``rows[g]``.

    ``order`` permutes samples into that sorted order; None when each row's samples are already
    contiguous (then groups are slices of the batch, no copy).
    """

    rows: list[int]
    bounds: list[int]
    order: Tensor | None

    @property
    def distinct(self) -> int:
        return len(set(self.rows))


class Routing:
    """Which factor row each sample of a mounted LoRA uses; its grouping is computed once and
    shared by every target (one host read of the index per batch size)."""

    def __init__(self, rows: int, index: Tensor | None):
        self.rows, self.index = rows, index
        self._groups: dict[tuple[int, torch.device], Groups] = {}

    @property
    def samples(self) -> int:
        """m: samples described (the index's length, else the factor rows)."""
        return self.rows if self.index is None else self.index.shape[0]

    def sample_rows(self, batch: int, device: torch.device) -> Tensor:
        """(batch,) factor row of every input sample (an index of m < batch tiles)."""
        rows = torch.arange(self.rows, device=device) if self.index is None else self.index.to(device)
        k = batch // rows.shape[0]
        return rows.repeat(k) if k > 1 else rows

    def groups(self, batch: int, device: torch.device) -> Groups:
        key = (batch, device)
        if key not in self._groups:
            rows = self.sample_rows(batch, device)
            runs, counts = torch.unique_consecutive(rows, return_counts=True)
            order = None
            if len(runs) > len(torch.unique(runs)):  # some row's samples are not contiguous: sort them
                rows, order = torch.sort(rows, stable=True)
                runs, counts = torch.unique_consecutive(rows, return_counts=True)
            if runs.numel() and (runs.min() < 0 or runs.max() >= self.rows):
                raise IndexError(f"LoRA index holds rows {runs.min().item()}..{runs.max().item()}, "
                                 f"but the factors have {self.rows} rows")
            self._groups[key] = Groups(runs.tolist(), [0, *counts.cumsum(0).tolist()], order)
        return self._groups[key]


def choose_path(routing: Routing, batch: int, factor_elements: int = 0, activation_elements: int = 0,
                device: torch.device | None = None, where: str = "LoRA") -> str:
    """The path ``"auto"`` (or the forced path) takes for a mounted LoRA on an input batch.

    Without an index the LoRA batch decides: one row ``plain``, one per sample ``per_sample``,
    a divisor of the batch ``tiled``. With an index (m distinct rows over b samples) a cost model
    in elements moved picks the cheaper of

        per_sample: GATHER_COST + b * factor_elements   (a factor row per sample, read twice)
        segmented:  m * (GROUP_COST + factor_elements)  (each distinct row once)
                    + 2 * b * activation_elements       (only when a row's samples are scattered:
                                                         gathering inputs and outputs)

    where ``factor_elements`` = r (in + out) of one row and ``activation_elements`` = one sample's
    input and output elements. So repeated LoRAs are segmented unless there are many small groups
    (the per-group cost wins) or scattered samples carry many tokens (gathering activations costs
    more than gathering factor rows). Under ``torch.compile`` it is ``per_sample``, unread.
    ``funcmem bench`` (``mix``) measures both paths against this choice.
    """
    k = tiles(routing.samples, batch, where)
    if _path != "auto":
        return _path
    if routing.index is None:
        return "plain" if routing.rows == 1 else ("per_sample" if k == 1 else "tiled")
    if torch.compiler.is_compiling():
        return "per_sample"
    groups = routing.groups(batch, device or routing.index.device)
    per_sample = GATHER_COST + batch * factor_elements
    segmented = groups.distinct * (GROUP_COST + factor_elements)
    if groups.order is not None:
        segmented += 2 * batch * activation_elements
    return "segmented" if groups.distinct == 1 or segmented < per_sample else "per_sample"


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


class _WeightedLoRA(LoRALayer):
    """Wrappers of layers with one ``weight``: expose it (and ``bias``) as PEFT's layers do."""

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias


def _shrink(x: Tensor, a: Tensor) -> Tensor:
    """``x A^T`` per sample: x (n, T, in), a (n, r, in) -> (n, T, r).

    With a rank narrower than 16 and at least 16 tokens it runs as ``(A x^T)^T`` (a transposed
    view, no copy): CPU BLAS kernels are up to ~2x faster in that orientation for such skinny
    products (measured with MKL; same result).
    """
    if a.shape[1] < 16 and x.shape[1] >= 16:
        return torch.bmm(a, x.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(x, a.transpose(1, 2))


class LinearLoRA(_WeightedLoRA):
    """LoRA on ``nn.Linear``; input (b, ..., in_features).

    Per sample: shrink ``h = bmm(x, A^T)`` (b, T, r), then expand fused into the output
    ``y += scale * bmm(h, B^T)`` (``baddbmm``): 2 b T r (in + out) extra FLOPs, no dense weight.
    """

    def weight_delta(self, name, a, b, scale):
        return scale * (b @ a)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if "weight" not in self.factors:
            return y
        return self._add_lora(x, y, self.factors["weight"])

    def _plain(self, x, y, a, b, scale, inplace):
        h = _shrink(x.reshape(1, -1, x.shape[-1]), a[None])[0]  # (b*T, r)
        if inplace:
            y.view(-1, y.shape[-1]).addmm_(h, b.T, alpha=scale)
            return y
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, b.T, alpha=scale).view(y.shape)

    def _per_sample(self, x, y, a, b, scale, inplace):
        n = a.shape[0]
        if x.shape[0] != n:  # CFG copies: the kernel once per copy, on views (factors not repeated)
            parts = [self._per_sample(x[c:c + n], y[c:c + n], a, b, scale, inplace) for c in range(0, x.shape[0], n)]
            return y if inplace else torch.cat(parts)
        h = _shrink(x.reshape(n, -1, x.shape[-1]), a)  # (n, T, r)
        if inplace:
            y.view(n, -1, y.shape[-1]).baddbmm_(h, b.transpose(1, 2), alpha=scale)  # expand into y
            return y
        return torch.baddbmm(y.reshape(n, -1, y.shape[-1]), h, b.transpose(1, 2), alpha=scale).view(y.shape)


class Conv2dLoRA(_WeightedLoRA):
    """LoRA on ``nn.Conv2d`` as PEFT does it: A a conv with the base kernel, B a 1x1 conv.

    Input (b, C, H, W). Per sample, A (n, r, C*kh*kw) is used as conv weights (n*r, C, kh, kw) in
    one grouped convolution over the samples' channel blocks; B is a batched matmul into the output.
    """

    def weight_delta(self, name, a, b, scale):
        conv = self.base_layer
        return scale * (b @ a).view(conv.out_channels, conv.in_channels, *conv.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if "weight" not in self.factors:
            return y
        if x.dim() != 4:
            raise ValueError(f"Conv2d LoRA needs a batched input (b, C, H, W), got {tuple(x.shape)}")
        return self._add_lora(x, y, self.factors["weight"])

    def _conv_a(self, x: Tensor, a: Tensor, groups: int) -> Tensor:
        """x (k, groups*C, H, W) through A as conv weights (groups*r, C, kh, kw) -> (k, groups*r, H', W')."""
        conv = self.base_layer
        w = a.reshape(-1, conv.in_channels, *conv.kernel_size)
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, groups=groups)

    def _plain(self, x, y, a, b, scale, inplace):
        h = self._conv_a(x, a, 1).flatten(2)  # (b, r, H'W')
        bb = b.expand(x.shape[0], -1, -1)
        if inplace:
            y.view(*y.shape[:2], -1).baddbmm_(bb, h, alpha=scale)
            return y
        return torch.baddbmm(y.reshape(*y.shape[:2], -1), bb, h, alpha=scale).view(y.shape)

    def _per_sample(self, x, y, a, b, scale, inplace):
        (n, r), k = a.shape[:2], x.shape[0] // a.shape[0]
        h = self._conv_a(x.reshape(k, -1, *x.shape[2:]), a, n).view(k, n, r, -1)  # (k, n, r, H'W')
        y4 = y.view(k, n, y.shape[1], -1) if inplace else y.reshape(k, n, y.shape[1], -1)
        if inplace:  # CFG copies (k > 1) share the factors
            for c in range(k):
                y4[c].baddbmm_(b, h[c], alpha=scale)
            return y
        if k == 1:
            return torch.baddbmm(y4[0], b, h[0], alpha=scale).view(y.shape)
        return (y4 + b @ (h * scale)).view(y.shape)  # (n, out, r) @ (k, n, r, H'W')


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
            import inspect

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


def _hide_base_layer(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _expose_base_layer(module, state_dict, prefix, *args) -> None:
    inner = prefix + "base_layer."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


WRAPPERS = {"linear": LinearLoRA, "conv2d": Conv2dLoRA, "experts": ExpertsLoRA}


def _owner_and_weight(target: Target) -> tuple[str, str]:
    """Module path of the wrapper and the weight name inside its base layer."""
    if target.kind == "experts":
        owner, _, weight = target.name.rpartition(".")
        return owner, weight
    return target.name, "weight"


def inject(model: nn.Module, targets: list[Target]) -> dict[str, tuple[LoRALayer, str]]:
    """Wrap every target's module (once; existing funcmem wrappers are reused).

    Returns: target name -> (wrapper, weight name inside ``wrapper.base_layer``).
    """
    handles = {}
    for t in targets:
        owner, weight = _owner_and_weight(t)
        module = model.get_submodule(owner)
        if not isinstance(module, LoRALayer):
            parent_name, _, child = owner.rpartition(".")
            module = WRAPPERS[t.kind](module)
            setattr(model.get_submodule(parent_name), child, module)
        handles[t.name] = (module, weight)
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
