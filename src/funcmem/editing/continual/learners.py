"""The continual methods as learners: ``learn(k, data, name)`` teaches stage k from its data only;
``storage()`` says what keeping the method costs (weights and stored conditions, in bytes).

- ``SequentialShared`` (``shared_lora_sequential``): one static LoRA fine-tuned stage after stage;
- ``PerStage`` (``per_task_lora``): a new LoRA per stage, picked at test time by the true group
  label (no forgetting by construction; storage grows by one LoRA per stage);
- ``GeneratorLearner`` (``fm_naive`` / ``fm_replay``): the generator (and, in stage 1, its
  condition projector) fine-tuned stage after stage; ``fm_replay`` keeps a ``ConditionStore`` of a
  few instances per edit and adds functional distillation (``funcmem.distill``) from stage 2 on.

The projector is frozen after stage 1 in both generator methods, so a stored condition vector
stays the generator's input for that instance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...distill import ConditionStore, FunctionalDistillation
from ..benchmark.sets import EditSet
from ..benchmark.training import make_memory, train
from ..methods import Bank, Shared, mse_loss
from .config import EDIT_NAMES, METHODS, ContinualConfig


def _float_bytes(*modules) -> int:
    """float32 bytes of the modules' parameters, trainable or frozen."""
    return 4 * sum(p.numel() for m in modules for p in m.parameters())


class ReplayLoss:
    """Image MSE on the current stage + ``weight`` x functional distillation on stored conditions
    (the previous generator's updates, recorded when the stage starts)."""

    def __init__(self, memory, store: ConditionStore, weight: float, batch: int, seed: int):
        self.weight = weight
        self.distill = FunctionalDistillation(memory, store, batch, seed)  # memory.generate masks padding, as at use

    def __call__(self, method, batch: dict):
        task = mse_loss(method, batch)
        distill = self.distill(method)
        return task + self.weight * distill, {"task": task.detach(), "distill": distill.detach()}


class SequentialShared:
    """``shared_lora_sequential``: one LoRA, fine-tuned stage after stage."""

    def __init__(self, editor, cfg: ContinualConfig):
        b = cfg.benchmark
        torch.manual_seed(cfg.seed)
        self.method = Shared(editor, b.targets, b.rank, b.alpha).to(b.device)
        self.cfg = cfg

    def learn(self, k: int, data: EditSet, name: str) -> None:
        b = self.cfg.benchmark
        train(self.method, data, self.cfg.condition, b, b.lr_lora, self.cfg.seed * 100 + k, name)

    def storage(self) -> dict:
        return {"weights": _float_bytes(self.method.lora_A, self.method.lora_B), "store": 0}


class StageLoRAs(Bank):
    """One LoRA per stage; a sample picks the LoRA of its edit's stage (the true label: an oracle)."""

    def __init__(self, editor, targets, rank: int, alpha: float, groups: dict):
        super().__init__(editor, targets, rank, alpha, len(groups))
        stage_of = torch.zeros(len(EDIT_NAMES), dtype=torch.long)
        for k, edits in enumerate(groups.values()):
            stage_of[[EDIT_NAMES.index(e) for e in edits]] = k
        self.register_buffer("stage_of", stage_of)
        self.taught = 0  # stages learnt so far: only their LoRAs count towards storage

    def choice(self, batch: dict) -> Tensor:
        return self.stage_of[batch["edit_ids"]]


class PerStage:
    """``per_task_lora``: stage k trains LoRA k only; the others stay frozen."""

    def __init__(self, editor, cfg: ContinualConfig):
        b = cfg.benchmark
        torch.manual_seed(cfg.seed)
        self.method = StageLoRAs(editor, b.targets, b.rank, b.alpha, cfg.groups).to(b.device)
        self.cfg = cfg

    def learn(self, k: int, data: EditSet, name: str) -> None:
        b = self.cfg.benchmark
        factors = [*self.method.lora_A.values(), *self.method.lora_B.values()]
        only_k = lambda grad: grad * (torch.arange(len(grad), device=grad.device) == k).view(-1, *[1] * (grad.dim() - 1))
        hooks = [p.register_hook(only_k) for p in factors]  # the other stages' rows get no gradient: AdamW
        try:  # (fresh each stage, no weight decay) leaves them exactly as they are
            train(self.method, data, self.cfg.condition, b, b.lr_lora, self.cfg.seed * 100 + k, name)
        finally:
            for h in hooks:
                h.remove()
        self.method.taught = k + 1

    def storage(self) -> dict:
        rows = [p[:self.method.taught] for p in (*self.method.lora_A.values(), *self.method.lora_B.values())]
        return {"weights": 4 * sum(r.numel() for r in rows), "store": 0}


class GeneratorLearner:
    """``fm_naive`` / ``fm_replay``: one generator fine-tuned stage after stage; with ``replay`` it keeps a
    ``ConditionStore`` and adds the distillation term from stage 2 on."""

    def __init__(self, editor, raw_dims, first_train_raw: dict, cfg: ContinualConfig, replay: bool):
        # projector standardisation: statistics of the first stage's training features (the only data it has seen)
        self.method = make_memory(editor, first_train_raw, raw_dims, cfg.benchmark, cfg.seed)
        self.cfg, self.replay = cfg, replay
        self.store = ConditionStore()
        self.history: list[list[dict]] = []

    def learn(self, k: int, data: EditSet, name: str) -> None:
        cfg, b = self.cfg, self.cfg.benchmark
        loss_fn = mse_loss
        if self.replay and len(self.store):
            loss_fn = ReplayLoss(self.method, self.store, cfg.distill_weight, cfg.replay_batch, cfg.seed * 100 + k)
        self.history.append(train(self.method, data, cfg.condition, b, b.lr_generator, cfg.seed * 100 + k, name,
                                  loss_fn=loss_fn))
        if k == 0:  # stored condition vectors must stay the generator's input for their instance
            self.method.projector.requires_grad_(False)
        if self.replay:
            self.remember(data)

    @torch.no_grad()
    def remember(self, data: EditSet) -> None:
        """Store the condition vectors of the first ``store_per_edit`` training instances of each edit."""
        ids = data.edit_ids.cpu()
        idx = torch.cat([(ids == e).nonzero().flatten()[:self.cfg.store_per_edit] for e in ids.unique().tolist()])
        batch = data.batch(idx.to(data.edit_ids.device), self.cfg.condition)
        self.store.add(self.method.condition(batch).cpu(), batch["edit_ids"].cpu())

    def storage(self) -> dict:
        m = self.method
        return {"weights": _float_bytes(m.projector, m.fm.generator), "store": self.store.nbytes}


def make_learners(editor, encoder, first_train: EditSet, cfg: ContinualConfig, methods=METHODS) -> dict:
    """The named methods' learners; the generators' projectors standardise with ``first_train``'s features."""
    raw = first_train.raw[cfg.condition]
    makers = {"shared_lora_sequential": lambda: SequentialShared(editor, cfg),
              "per_task_lora": lambda: PerStage(editor, cfg),
              "fm_naive": lambda: GeneratorLearner(editor, encoder.raw_dims, raw, cfg, False),
              "fm_replay": lambda: GeneratorLearner(editor, encoder.raw_dims, raw, cfg, True)}
    unknown = [m for m in methods if m not in makers]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; methods: {list(makers)}")
    return {m: makers[m]() for m in methods}
