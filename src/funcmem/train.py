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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .io import read_safetensors, write_safetensors

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
        progress: show a tqdm bar.
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
        self.history: list[dict] = []

    # -------------------------------------------------------------- checkpoints

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.out_dir) / CHECKPOINT_NAME if self.config.out_dir else None

    def save_checkpoint(self) -> None:
        """Trainable weights + AdamW state + RNG, step in the metadata; one atomic file."""
        tensors = {f"model.{n}": p for p, n in self.names.items()}
        order = [self.names[p] for g in self.optimizer.param_groups for p in g["params"]]
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                tensors[f"optim.{self.names[p]}.{key}"] = torch.as_tensor(value)
        tensors["rng.torch"] = torch.get_rng_state()
        meta = {"step": str(self.step), "param_order": json.dumps(order), "config": json.dumps(asdict(self.config))}
        write_safetensors(self.checkpoint_path, tensors, metadata=meta)

    def load_checkpoint(self) -> bool:
        """Restore from ``out_dir``; False when there is no checkpoint yet."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = read_safetensors(path)
        by_name = {n: p for p, n in self.names.items()}
        saved = {k[len("model."):] for k in tensors if k.startswith("model.")}
        if saved != set(by_name):
            raise ValueError(f"{path} was written for other parameters: missing {sorted(set(by_name) - saved)[:5]}, "
                             f"unexpected {sorted(saved - set(by_name))[:5]}")
        with torch.no_grad():
            for name, p in by_name.items():
                p.copy_(tensors[f"model.{name}"])
        for p, name in self.names.items():
            state = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim.{name}.")}
            if state:
                self.optimizer.state[p] = state
        torch.set_rng_state(tensors["rng.torch"])
        self.step = int(meta["step"])
        self._truncate_metrics()
        return True

    def _truncate_metrics(self) -> None:
        """Drop log lines written after the checkpoint we resume from (they will be redone)."""
        file = Path(self.config.out_dir) / METRICS_NAME
        if file.is_file():
            rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
            self.history = [r for r in rows if r["step"] <= self.step]
            file.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -------------------------------------------------------------- loop

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.out_dir:
            with open(Path(self.config.out_dir) / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self, batch) -> dict:
        """One optimisation step on ``batch``; returns its metrics."""
        cfg, params = self.config, list(self.names)
        device = params[0].device
        for group, scale in zip(self.optimizer.param_groups, self.lr_scales):
            group["lr"] = cfg.lr * scale * lr_factor(self.step, cfg)
        dtype = _autocast_dtype(cfg.precision, device)
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = self.loss_fn(self.module, batch)
        loss, extra = out if isinstance(out, tuple) else (out, {})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.step += 1
        return {"step": self.step, "loss": loss.item(), "grad_norm": norm.item(),
                "lr": self.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in extra.items()}}

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
            self.load_checkpoint()
        elif cfg.out_dir and (Path(cfg.out_dir) / METRICS_NAME).exists():
            (Path(cfg.out_dir) / METRICS_NAME).unlink()
        batch_fn = batches if callable(batches) else _from_iterable(batches)
        self.module.train()
        start = time.perf_counter()
        if callback:
            callback(self)
        with tqdm(total=cfg.steps, initial=self.step, disable=not cfg.progress, desc=cfg.description,
                  dynamic_ncols=True) as bar:
            while self.step < cfg.steps:
                record = self.train_step(batch_fn(self.step))
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4g}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log({**record, "time": round(time.perf_counter() - start, 3)})
                if cfg.out_dir and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                    self.save_checkpoint()
                if callback:
                    callback(self)
        return self.history


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
