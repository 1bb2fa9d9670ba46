"""Which path applies a mounted LoRA: the LoRA's routing over the input batch, and the choice.

Paths (every one gives the same result; see ``funcmem.mount`` for how they work):
``plain`` (one factor row for the batch), ``per_sample``, ``tiled`` (CFG copies) and
``segmented`` (samples grouped by factor row). ``choose_path`` picks one with a small cost model;
``set_lora_path`` / ``lora_path`` force one in the current thread (or asyncio task): the choice is
a ``contextvars.ContextVar``, so a server's worker thread forcing a path leaves every other
thread on ``"auto"``. Code traced by ``torch.compile`` does not read it (see ``choose_path``).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

PATHS = ("auto", "per_sample", "segmented")
# auto's cost model (``choose_path``), in tensor elements moved; fitted on CPU with ``funcmem bench lora``
GROUP_COST = 20_000  # fixed cost of applying one group on the segmented path (Python, op dispatch)
GATHER_COST = 60_000  # fixed cost of the per-sample path with an index (gathering rows, batched matmuls)
_path: ContextVar[str] = ContextVar("funcmem_lora_path", default="auto")


def set_lora_path(path: str) -> None:
    """How mounted LoRAs are applied from now on, in this thread or task: ``"auto"`` (default),
    ``"per_sample"`` or ``"segmented"``.

    A forced path applies to every LoRA, whatever its batch: ``"per_sample"`` gathers one factor
    row per sample, ``"segmented"`` groups samples by factor row (slow with many distinct rows).
    Benchmarks and tests force paths; applications leave ``"auto"``. Other threads keep their own
    choice (a new thread starts on ``"auto"``).
    """
    if path not in PATHS:
        raise ValueError(f"unknown LoRA path {path!r}; choose one of {PATHS}")
    _path.set(path)


def current_path() -> str:
    """The path forced in this thread or task (``"auto"``: none)."""
    return _path.get()


@contextmanager
def lora_path(path: str):
    """``set_lora_path`` for the duration of a block (this thread or task only)."""
    if path not in PATHS:
        raise ValueError(f"unknown LoRA path {path!r}; choose one of {PATHS}")
    token = _path.set(path)
    try:
        yield
    finally:
        _path.reset(token)


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
    more than gathering factor rows). Under ``torch.compile`` it is ``per_sample``, unread, and a
    forced path is not read either (the traced graph depends on shapes alone; every path gives the
    same result).
    ``funcmem bench lora`` (``mix``) measures both paths against this choice.
    """
    k = tiles(routing.samples, batch, where)
    compiling = torch.compiler.is_compiling()
    if not compiling and _path.get() != "auto":  # traced graphs read no context variable
        return _path.get()
    if routing.index is None:
        return "plain" if routing.rows == 1 else ("per_sample" if k == 1 else "tiled")
    if compiling:
        return "per_sample"
    groups = routing.groups(batch, device or routing.index.device)
    per_sample = GATHER_COST + batch * factor_elements
    segmented = groups.distinct * (GROUP_COST + factor_elements)
    if groups.order is not None:
        segmented += 2 * batch * activation_elements
    return "segmented" if groups.distinct == 1 or segmented < per_sample else "per_sample"
