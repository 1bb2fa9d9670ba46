"""Training beyond one process: process-group set-up, batch sharding, DDP and FSDP wrapping.

``Trainer`` uses these when ``TrainConfig.distributed`` is ``"ddp"`` or ``"fsdp"`` (or ``"auto"``
under ``torchrun``); a script needs no other change::

    torchrun --nproc_per_node 4 train.py          # one machine, 4 processes (GPUs)

    trainer = Trainer(fm, loss_fn, TrainConfig(distributed="auto", ...))  # joins the process group
    trainer.fit(batch_fn)                         # batch_fn(step) -> the *global* batch

- Each rank trains on its contiguous shard of the global batch (``shard_batch``): rank k of w takes
  samples ``k*G/w : (k+1)*G/w`` of every tensor whose first dimension is the global batch G.
  With a per-sample mean loss and gradients averaged over ranks, a w-process run follows the same
  curve as a 1-process run with batch G (up to float summation order).
- ``ddp``: ``DistributedDataParallel`` over a small module whose forward is ``loss_fn(module, batch)``,
  so a loss function may call any method of the module (``fm.generate``, ``fm.mounted``...) and the
  gradients are still averaged. Frozen weights (the base) are not synchronised after the start.
- ``fsdp``: FSDP2 ``fully_shard`` on the generator's blocks and the generator (parameters become
  ``DTensor`` shards), for a generator too large to replicate; the frozen base is replicated.
- Checkpoints hold full, unsharded tensors, written by rank 0 alone (atomically) after gathering;
  every rank reads them back and takes its own shard, so a run resumes on any world size.

Backends: ``nccl`` when CUDA is available (each process uses ``cuda:LOCAL_RANK``), ``gloo`` on CPU.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

MODES = ("auto", "none", "ddp", "fsdp")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Processes in the group (1 outside a process group)."""
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by ``torchrun``)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    """True on rank 0, the process that writes checkpoints, logs and shows progress."""
    return rank() == 0


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def init_from_env(backend: str | None = None, timeout_s: float = 1800) -> bool:
    """Join the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).

    Args:
        backend: ``"nccl"`` / ``"gloo"``; None picks nccl with CUDA, else gloo.
        timeout_s: collective timeout.

    Returns:
        True when this process is in a group of several processes (it may already have been),
        False for a single process (``WORLD_SIZE`` unset or 1: nothing is initialised).
    """
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE > 1 but {missing} are not set: launch with torchrun")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Leave the process group (call once at the end of a script)."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[local_rank()])
        else:
            dist.barrier()


def resolve_mode(mode: str) -> str:
    """``"auto"`` -> ``"ddp"`` under a multi-process launch (joining its group), else ``"none"``.

    ``"ddp"`` / ``"fsdp"`` join the group ``torchrun`` describes when none is initialised yet;
    with a single process they train as ``"none"`` would.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return "none"
    multi = init_from_env()
    if mode == "auto":
        return "ddp" if multi else "none"
    return mode if multi else "none"


# ---------------------------------------------------------------------------- batches


def _global_batch(batch: Any) -> int | None:
    """The first dimension shared by the batch's tensors (the largest, when they differ)."""
    sizes = [t.shape[0] for t in _tensors(batch) if t.dim()]
    return max(sizes) if sizes else None


def _tensors(obj: Any):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """This rank's contiguous shard of a global batch.

    Every tensor (inside tuples, lists, dicts) whose first dimension is the global batch G is cut
    to rows ``rank*G/world : (rank+1)*G/world``; other values pass unchanged.

    Raises:
        ValueError: G is not divisible by ``world`` (ranks must hold equal shards for the averaged
            gradient to equal the global-batch gradient).
    """
    if world == 1:
        return batch
    g = _global_batch(batch)
    if g is None:
        raise ValueError("cannot shard a batch without tensors; return the rank's shard and set shard_batch=False")
    if g % world:
        raise ValueError(f"global batch {g} is not divisible by the world size {world}")
    size = g // world

    def cut(obj):
        if isinstance(obj, Tensor):
            return obj[rank * size:(rank + 1) * size] if obj.dim() and obj.shape[0] == g else obj
        if isinstance(obj, dict):
            return type(obj)((k, cut(v)) for k, v in obj.items())
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):
            return type(obj)(*map(cut, obj))
        if isinstance(obj, (list, tuple)):
            return type(obj)(map(cut, obj))
        return obj

    return cut(batch)


def mean_over_ranks(values: Tensor) -> Tensor:
    """All-reduced mean of a tensor over ranks (itself in a single process)."""
    if not is_initialized() or world_size() == 1:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


# ---------------------------------------------------------------------------- modules


class LossModule(nn.Module):
    """``forward(batch) = loss_fn(module, batch)``: what DDP wraps, so any loss function that calls
    the module's methods still goes through DDP's forward (which arms gradient averaging)."""

    def __init__(self, module: nn.Module, loss_fn: Callable):
        super().__init__()
        self.module, self.loss_fn = module, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.module, batch)


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (all start from the same weights)."""
    if not is_initialized() or world_size() == 1:
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src)


def wrap_ddp(module: nn.Module, loss_fn: Callable) -> nn.Module:
    """``DistributedDataParallel(LossModule(module, loss_fn))``; rank 0's weights are broadcast."""
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    ids = [dev.index if dev.index is not None else local_rank()] if dev.type == "cuda" else None
    import inspect

    # buffers are synced from rank 0 at the start only (the frozen base's buffers do not change)
    no_resync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                 else "broadcast_buffers")
    return DistributedDataParallel(LossModule(module, loss_fn), device_ids=ids, **{no_resync: False})


def fsdp_shard(module: nn.Module, param_groups: list[dict] | None = None) -> list[dict] | None:
    """FSDP2 ``fully_shard`` the trainable part of a ``FunctionalMemory`` in place.

    Each generator block is one shard unit, the generator (embeddings, heads) another; the frozen
    base is left replicated. Rank 0's weights are broadcast first. Parameters become new ``DTensor``
    shards of dimension 0, so build optimisers after this call.

    Returns:
        ``param_groups`` with each parameter replaced by its sharded successor (same name), or None.

    Raises:
        TypeError: the module has no ``generator`` (FSDP here shards a parameter generator;
            a ``SharedLoRA`` is small enough for DDP).
    """
    from torch.distributed.fsdp import fully_shard

    generator = getattr(module, "generator", None)
    if not isinstance(generator, nn.Module):
        raise TypeError(f"distributed='fsdp' shards a FunctionalMemory's generator; {type(module).__name__} has none "
                        "(use distributed='ddp')")
    broadcast_module(module)
    names = {p: n for n, p in module.named_parameters()}
    groups = [{**g, "params": [names[p] for p in g["params"]]} for g in param_groups or []]
    for block in getattr(getattr(generator, "model", generator), "blocks", []):
        fully_shard(block)
    fully_shard(generator)
    sharded = dict(module.named_parameters())
    return [{**g, "params": [sharded[n] for n in g["params"]]} for g in groups] if param_groups else None


def full_tensor(t: Tensor) -> Tensor:
    """A ``DTensor`` gathered whole (a collective: every rank must call it); other tensors as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def like(full: Tensor, reference: Tensor) -> Tensor:
    """``full`` (an unsharded tensor read from a checkpoint) laid out like ``reference``: this rank's
    shard when ``reference`` is a ``DTensor``, else moved to its device."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor):
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full.to(reference.device)


def mean_metrics(loss: Tensor, extra: dict) -> tuple[float, dict[str, float]]:
    """The loss and extra metrics averaged over ranks (one all-reduce), as floats."""
    if not is_initialized() or world_size() == 1:
        return loss.item(), {k: float(v) for k, v in extra.items()}
    values = torch.stack([loss.detach().float().reshape(()),
                          *[torch.as_tensor(float(v), device=loss.device) for v in extra.values()]])
    values = mean_over_ranks(values).tolist()
    return values[0], dict(zip(extra, values[1:]))
