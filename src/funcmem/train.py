"""Training the generator (or a shared LoRA) end to end through the frozen base's own loss.

    trainer = Trainer(fm, loss_fn, TrainConfig(steps=1000, lr=1e-3, out_dir="runs/x"))
    trainer.fit(batch_fn)               # batch_fn(step) -> batch; loss_fn(fm, batch) -> loss
    trainer.fit(batch_fn, resume=True)  # after a kill: continues at the last checkpoint's step

Only parameters with ``requires_grad`` are optimised (the base is frozen by ``FunctionalMemory``).
A checkpoint is one safetensors file holding the trainable weights, the AdamW state and the RNG
state, with the step in its metadata, written atomically; batches come from ``batch_fn(step)``,
so a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from . import distributed
from .guard import NonFiniteLoRAError
from .io import read_safetensors, read_safetensors_metadata, write_safetensors
from .progress import progress as show_progress

CHECKPOINT_NAME, METRICS_NAME = "checkpoint.safetensors", "metrics.jsonl"


@dataclass
class TrainConfig:
    """Optimisation settings.

    Args:
        steps: optimizer steps in all.
        lr: peak learning rate (param groups may scale it with ``lr_scale``).
        weight_decay, betas: AdamW's.
        warmup_steps: linear warmup, then cosine decay to ``min_lr_ratio * lr``.
        grad_clip: max global grad norm (0 turns clipping off).
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 where the device supports it: CUDA).
        out_dir: where checkpoints and ``metrics.jsonl`` go (None: nowhere).
        checkpoint_every, log_every: in steps.
        progress: show progress (a bar on a terminal, a line every 10% or 30 s elsewhere).
        distributed: "none", "ddp", "fsdp" or "auto" (ddp under a multi-process ``torchrun``
            launch, else none); see ``funcmem.distributed``. Rank 0 writes checkpoints and logs.
        shard_batch: with several processes, ``batch_fn(step)`` returns the global batch and each
            rank trains on its contiguous shard; False: it already returns this rank's shard.
        max_skipped_steps: a step whose generated LoRA, loss or gradient is NaN/Inf is skipped
            (the step counts, the weights and AdamW state do not move; ``skipped_steps`` in the
            metrics); more skips than this in one run raise ``FloatingPointError`` (0: the first).
        routing_margin: at every logged step of a module that holds a ``FunctionalMemory``, also
            log ``routing_margin`` = the loss with the batch's conditions shuffled (each sample
            gets another's) minus the true loss, both without gradient, before the step.
        collapse_tolerance, collapse_logs: warn once (``CollapseWarning``) when ``routing_margin``
            stays below ``collapse_tolerance`` x the loss for ``collapse_logs`` logged steps in a
            row after warm-up (past ``warmup_steps`` and a fifth of ``steps``: a generator starts
            at the base, where every condition gives the same, zero, update): the generator has
            likely collapsed to one condition-independent LoRA.
    """

    steps: int = 1000
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    precision: str = "auto"
    out_dir: str | None = None
    checkpoint_every: int = 100
    log_every: int = 10
    progress: bool = True
    description: str = "train"
    distributed: str = "auto"
    shard_batch: bool = True
    max_skipped_steps: int = 10
    routing_margin: bool = True
    collapse_tolerance: float = 0.01
    collapse_logs: int = 3


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Warmup + cosine multiplier of the peak LR at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")


class Trainer:
    """Optimises a module's trainable parameters against ``loss_fn(module, batch)``.

    Args:
        module: e.g. a ``FunctionalMemory`` or ``SharedLoRA`` (only ``requires_grad`` params move).
        loss_fn: ``(module, batch) -> loss`` or ``-> (loss, {name: float})`` for extra metrics.
        config: a ``TrainConfig``.
        param_groups: optional ``[{"params": [...], "lr_scale": 0.5}, ...]`` to give parts of the
            module their own LR; every trainable parameter must be in exactly one group.
    """

    def __init__(self, module: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor | tuple[Tensor, dict]],
                 config: TrainConfig | None = None, param_groups: list[dict] | None = None):
        self.module, self.loss_fn, self.config = module, loss_fn, config or TrainConfig()
        self.mode = distributed.resolve_mode(self.config.distributed)
        if self.mode == "fsdp":  # parameters become DTensor shards: before names and the optimizer
            param_groups = distributed.fsdp_shard(module, param_groups)
        self.names = {p: n for n, p in module.named_parameters() if p.requires_grad}
        if not self.names:
            raise ValueError("the module has no trainable parameters")
        groups = param_groups or [{"params": list(self.names)}]
        grouped = [p for g in groups for p in g["params"]]
        if len(grouped) != len(set(grouped)) or set(grouped) != set(self.names):
            raise ValueError("param_groups must hold every trainable parameter exactly once")
        self.lr_scales = [g.get("lr_scale", 1.0) for g in groups]
        cfg = self.config
        self.optimizer = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=cfg.lr,
                                           betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.step = 0
        self.skipped = 0  # steps skipped for a non-finite LoRA, loss or gradient
        self.history: list[dict] = []
        self.ddp = distributed.wrap_ddp(module, loss_fn) if self.mode == "ddp" else None
        self.memory = _functional_memory(module) if self.config.routing_margin else None
        self._flat_margins = 0  # logged steps in a row with a margin near zero (after warm-up)
        self.collapse_warned = False

    # -------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.out_dir) / CHECKPOINT_NAME if self.config.out_dir else None

    def save_checkpoint(self) -> None:
        """Trainable weights + AdamW state + RNG, step in the metadata; one atomic file.

        Sharded (FSDP) tensors are gathered whole on every rank; rank 0 alone writes."""
        full = distributed.full_tensor
        tensors = {f"model.{n}": full(p.detach()) for p, n in self.names.items()}
        order = [self.names[p] for g in self.optimizer.param_groups for p in g["params"]]
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim.{self.names[p]}.{key}"] = full(torch.as_tensor(value))
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": str(self.step), "param_order": json.dumps(order), "config": json.dumps(asdict(self.config)),
                "skipped_steps": str(self.skipped)}
        if distributed.is_main():
            write_safetensors(self.checkpoint_path, tensors, metadata=meta)
        distributed.barrier()

    def load_checkpoint(self) -> bool:
        """Restore from ``out_dir``; False when there is no checkpoint yet."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        meta = read_safetensors_metadata(path)  # a damaged file: ValueError naming it
        tensors = read_safetensors(path)
        by_name = {n: p for p, n in self.names.items()}
        saved = {k[len("model."):] for k in tensors if k.startswith("model.")}
        if saved != set(by_name):
            raise ValueError(f"{path} was written for other parameters: missing {sorted(set(by_name) - saved)[:5]}, "
                             f"unexpected {sorted(saved - set(by_name))[:5]}")
        with torch.no_grad():
            for name, p in by_name.items():
                p.copy_(distributed.like(tensors[f"model.{name}"], p))  # this rank's shard under FSDP
        for p, name in self.names.items():
            state = {k.rsplit(".", 1)[1]: distributed.like(v, p) if v.shape == p.shape else v.to(p.device)
                     for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
            if state:
                self.optimizer.state[p] = state
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        self.skipped = int(meta.get("skipped_steps", 0))
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        file = Path(self.config.out_dir) / METRICS_NAME
        if file.is_file():
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r["step"] <= self.step]
            if distributed.is_main():
                file.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -------------------------------------------------------------- loop

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.out_dir and distributed.is_main():
            with open(Path(self.config.out_dir) / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, batch) -> dict:
        """One optimisation step on ``batch`` (the global batch under several processes, unless
        ``shard_batch`` is off); returns its metrics (averaged over ranks)."""
        cfg, params = self.config, list(self.names)
        if self.mode != "none" and cfg.shard_batch:
            batch = distributed.shard_batch(batch, distributed.rank(), distributed.world_size())
        device = params[0].device
        for group, scale in zip(self.optimizer.param_groups, self.lr_scales):
            group["lr"] = cfg.lr * scale * lr_factor(self.step, cfg)
        dtype = _autocast_dtype(cfg.precision, device)
        margin_rng = _rng_state(device) if self.memory is not None and self._logs_next_step() else None
        try:
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = self.ddp(batch) if self.ddp is not None else self.loss_fn(self.module, batch)
        except NonFiniteLoRAError as e:
            if self.mode != "none":  # raised on one rank only: skipping there alone would hang the others
                raise
            return self._skip(f"{e}")
        loss, extra = out if isinstance(out, tuple) else (out, {})
        if margin_rng is not None:
            extra = {**extra, "shuffled_loss": self._shuffled_loss(batch, device, dtype, margin_rng)}
        value, extra = distributed.mean_metrics(loss, extra)  # over ranks: all see the same value
        if "shuffled_loss" in extra:
            extra["routing_margin"] = extra.pop("shuffled_loss") - value
            self._watch_collapse(extra["routing_margin"], value)
        if not math.isfinite(value):
            return self._skip(f"loss is {value}", value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        norm = distributed.full_tensor(norm)  # a DTensor under FSDP
        if not math.isfinite(norm.item()):  # all-reduced: every rank sees the same norm
            self.optimizer.zero_grad(set_to_none=True)
            return self._skip(f"gradient norm is {norm.item()}", value)
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": value, "grad_norm": norm.item(),
                "lr": self.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped, **self._guard_counts(),
                **extra}

    def _logs_next_step(self) -> bool:
        step = self.step + 1
        return step % self.config.log_every == 0 or step == self.config.steps

    @torch.no_grad()
    def _shuffled_loss(self, batch, device: torch.device, dtype, rng: tuple) -> float:
        """The loss with every sample given another sample's condition (no gradient), with the
        random numbers the true loss drew (a loss that samples noise compares like with like);
        the RNG state afterwards is as if this never ran. NaN when the shuffled LoRA is not finite."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _set_rng_state(rng, device)
            try:
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None), \
                        self.memory.shuffled_conditions():
                    out = self.loss_fn(self.module, batch)
            except NonFiniteLoRAError:
                return math.nan
        return float((out[0] if isinstance(out, tuple) else out).detach())

    def _watch_collapse(self, margin: float, loss: float) -> None:
        """Warn once when the routing margin stays near zero after warm-up."""
        cfg = self.config
        if self.step + 1 <= max(cfg.warmup_steps, cfg.steps // 5) or not math.isfinite(margin):
            return
        self._flat_margins = self._flat_margins + 1 if margin < cfg.collapse_tolerance * abs(loss) else 0
        if self._flat_margins >= cfg.collapse_logs and not self.collapse_warned:
            self.collapse_warned = True
            warnings.warn(f"routing margin {margin:.3g} (loss {loss:.3g}) has stayed below {cfg.collapse_tolerance:g} "
                          f"x the loss for {self._flat_margins} logged steps at step {self.step + 1}: the generator's "
                          "LoRA barely depends on its condition (it may have collapsed to one LoRA for all)",
                          CollapseWarning, stacklevel=3)

    def _skip(self, reason: str, loss: float = math.nan) -> dict:
        """Count a step that leaves the weights alone (non-finite LoRA, loss or gradient)."""
        self.skipped += 1
        if self.skipped > self.config.max_skipped_steps:
            raise FloatingPointError(f"{reason} at step {self.step}: {self.skipped} non-finite steps in this run, "
                                     f"more than max_skipped_steps={self.config.max_skipped_steps}")
        warnings.warn(f"skipping step {self.step}: {reason}", stacklevel=3)
        self.step += 1
        return {"step": self.step, "loss": loss, "grad_norm": math.nan, "lr": self.optimizer.param_groups[0]["lr"],
                "skipped_steps": self.skipped, **self._guard_counts()}

    def _guard_counts(self) -> dict:
        """The generator's LoRA guard counters, when the module has one (``FunctionalMemory.guard``)."""
        guard = getattr(self.module, "guard", None)
        return {"lora_clipped": guard.clipped} if guard is not None and hasattr(guard, "clipped") else {}

    def fit(self, batches: Callable[[int], Any] | Iterable, resume: bool = False,
            callback: Callable[["Trainer"], None] | None = None) -> list[dict]:
        """Train to ``config.steps``. ``batches`` is ``batch_fn(step)`` or an iterable.

        With ``resume=True`` it continues from the checkpoint in ``out_dir`` when there is one
        (an iterable is advanced past the batches already used). ``callback(trainer)`` runs
        before the first step and after every step (``trainer.step`` says which).
        """
        cfg = self.config
        if cfg.out_dir:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        if resume:
            if not cfg.out_dir:
                raise ValueError("resume=True needs TrainConfig.out_dir")
            if not self.load_checkpoint():
                self._truncate_metrics()  # a run killed before its first checkpoint logged steps that redo
        elif cfg.out_dir and (Path(cfg.out_dir) / METRICS_NAME).exists() and distributed.is_main():
            (Path(cfg.out_dir) / METRICS_NAME).unlink()
        batch_fn = batches if callable(batches) else _from_iterable(batches)
        self.module.train()
        start = time.perf_counter()
        if callback:
            callback(self)
        with show_progress(total=cfg.steps, initial=self.step, disable=not (cfg.progress and distributed.is_main()),
                           desc=cfg.description) as bar:
            while self.step < cfg.steps:
                record = self.train_step(batch_fn(self.step))
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({**record, "time": round(time.perf_counter() - start, 3)})
                if cfg.out_dir and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint()
                if callback:
                    callback(self)
        return self.history


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class CollapseWarning(UserWarning):
    """The generator's output stopped depending on its condition (``TrainConfig.collapse_tolerance``)."""


def _functional_memory(module: nn.Module):
    """The module, or its first submodule, that can shuffle conditions (a ``FunctionalMemory``)."""
    for m in module.modules():
        if callable(getattr(m, "shuffled_conditions", None)):
            return m
    return None


def _from_iterable(iterable: Iterable) -> Callable[[int], Any]:
    """batch_fn over an iterable: asks must come in step order (skips ahead on resume)."""
    it, position = iter(iterable), 0

    def batch_fn(step: int):
        nonlocal position
        while position < step:
            next(it)
            position += 1
        position += 1
        return next(it)

    return batch_fn
