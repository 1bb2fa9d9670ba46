"""Continual learning: teach a trained generator new edits, one group after another, without
forgetting the old ones; and remove one edit again. ``funcmem continual`` runs the protocol.

Protocol: the edits come in groups (A: blur/sharpen + noise/denoise, B: age/restore + brightness,
C: contrast + colour temperature) trained one stage after another; stage k sees only group k's
training examples. After every stage each method is scored (PSNR) on the test examples of every
group seen so far, which fills a stage x group matrix R (R[i][j]: after stage i, on group j).

Methods (all on the same frozen base editor, data, steps, batch and seeds):

- ``shared_lora_sequential``: one static LoRA fine-tuned stage after stage (the forgetting baseline);
- ``per_task_lora``: a new LoRA per stage, picked at test time by the true group label (no
  forgetting by construction; storage grows by one LoRA per stage);
- ``fm_naive``: the generator (and, in stage 1, its condition projector) fine-tuned stage after stage;
- ``fm_replay``: as ``fm_naive``, plus *functional distillation*: a ``ConditionStore`` keeps the
  generator's input (projected condition vectors, float16, no images) of a few training instances
  per edit; during a later stage the generator's updates ``s B(c) A(c)`` for those stored c are
  held close to what the previous generator produced (``product_sq_distance``).

The projector is frozen after stage 1 in both generator methods, so a stored condition vector
stays the generator's input for that instance.

Removing an edit (``--forget EDIT``): ``forget_edit`` fine-tunes the ``fm_replay`` generator on
stored conditions only: the removed edit's conditions are driven to a zero update (the base's
output), the others are held at their current updates.

    groups -> per-stage EditSets (benchmark.build_set) -> for each stage, each method: learn, score
    -> matrices -> summarize (average PSNR, forgetting, backward transfer) -> continual.json/.png/.md
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import io
from ..lora import LoRA
from ..train import Trainer, TrainConfig
from .benchmark import BenchmarkConfig, EditSet, Timer, build_set, evaluate, make_memory, photo_split, train
from .conditions import MiniLMEfficientNet, TextEncoder
from .data import make_examples
from .editor import EditorConfig
from .methods import Bank, Base, Shared, mse_loss
from .metrics import psnr
from .ops import EDITS
from .pretrain import load_or_train_editor

METHODS = ("shared_lora_sequential", "per_task_lora", "fm_naive", "fm_replay")
GROUPS = {"A": ["blur", "sharpen", "add_noise", "denoise"],
          "B": ["age", "restore", "brighten", "darken"],
          "C": ["contrast_up", "contrast_down", "warmer", "cooler"]}
CONDITION = "encoders"  # the benchmark's default condition: MiniLM + EfficientNet-Lite0 streams
EDIT_NAMES = list(EDITS)  # edit ids index this list in every stage


@dataclass
class ContinualConfig:
    """Everything a continual run depends on (saved in ``continual.json``).

    Args:
        groups: stage name -> the edits it teaches, in training order.
        train_per_group, test_per_group: examples per stage (balanced over its edits).
        steps: optimisation steps per stage, for every method.
        store_per_edit: training instances per edit whose condition vectors ``fm_replay`` stores.
        distill_weight: weight of the functional-distillation term (relative to the image MSE).
        replay_batch: stored conditions per step (distillation and forgetting).
        forget_steps, forget_lr: the removal fine-tune (stored conditions only).
        The other fields mean what they mean in ``BenchmarkConfig``.
    """

    groups: dict = field(default_factory=lambda: {k: list(v) for k, v in GROUPS.items()})
    size: int = 32
    train_per_group: int = 1536
    test_per_group: int = 192
    steps: int = 600
    batch: int = 16
    rank: int = 4
    alpha: float = 4.0
    lr_lora: float = 3e-3
    lr_generator: float = 1e-3
    condition_dim: int = 64
    generator: dict = field(default_factory=lambda: BenchmarkConfig().generator)
    targets: list = field(default_factory=lambda: BenchmarkConfig().targets)
    store_per_edit: int = 8
    distill_weight: float = 1.0
    replay_batch: int = 16
    forget_steps: int = 300
    forget_lr: float = 1e-3
    editor: dict = field(default_factory=lambda: EditorConfig().to_dict())
    editor_steps: int = 1500
    images: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    seed: int = 0
    data_seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> "ContinualConfig":
        """Under 10 minutes on 2 CPU cores (the base editor cached; it is the quick demo's)."""
        base = dict(train_per_group=384, test_per_group=96, steps=200, replay_batch=8, forget_steps=150,
                    editor_steps=BenchmarkConfig.quick().editor_steps)
        return cls(**{**base, **overrides})

    def benchmark_config(self) -> BenchmarkConfig:
        """The benchmark's settings for one stage: ``benchmark.train`` / ``make_memory`` read them."""
        return BenchmarkConfig(size=self.size, steps=self.steps, batch=self.batch, rank=self.rank, alpha=self.alpha,
                               lr_lora=self.lr_lora, lr_generator=self.lr_generator,
                               condition_dim=self.condition_dim, generator=dict(self.generator),
                               targets=list(self.targets), conditions=[CONDITION], seeds=[self.seed],
                               editor=dict(self.editor), editor_steps=self.editor_steps, images=self.images,
                               device=self.device, cache_dir=self.cache_dir, data_seed=self.data_seed)


# ------------------------------------------------------------------ metrics


def summarize(matrix: list[list[float | None]]) -> dict:
    """Continual-learning summary of a stage x group score matrix (higher is better).

    R[i][j] is the score on group j after stage i (None before group j is taught, j > i); T stages.

    - ``average``: mean_j R[T-1][j], the final score over all groups;
    - ``forgetting``: per earlier group j < T-1, the best score it ever had before the end minus its
      final one, max_{j <= i < T-1} R[i][j] - R[T-1][j]; ``mean_forgetting`` averages them;
    - ``backward_transfer``: mean_{j < T-1} (R[T-1][j] - R[j][j]): < 0 when later stages hurt.
    With one stage, forgetting and backward transfer are 0.
    """
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError(f"need a square stage x group matrix, got {[len(r) for r in matrix]}")
    if any(matrix[i][j] is None for i in range(T) for j in range(i + 1)):
        raise ValueError("the matrix needs every entry on or below the diagonal")
    final = matrix[-1]
    forgetting = [max(matrix[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1)]
    bwt = [final[j] - matrix[j][j] for j in range(T - 1)]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {"average": mean(final), "forgetting": forgetting, "mean_forgetting": mean(forgetting),
            "backward_transfer": mean(bwt)}


# ------------------------------------------------------------------ functional distillation


def _inner(b1: Tensor, a1: Tensor, b2: Tensor, a2: Tensor) -> Tensor:
    """<B1 A1, B2 A2>_F per sample through r x r matrices (B A is never formed).

    tr(A1^T B1^T B2 A2) = tr((B1^T B2)(A2 A1^T)). Shapes: B (n, ..., out, r), A (n, ..., r, in) -> (n,).
    """
    bb = b1.transpose(-1, -2) @ b2  # (n, ..., r, r)
    aa = a2 @ a1.transpose(-1, -2)  # (n, ..., r, r)
    return (bb * aa.transpose(-1, -2)).flatten(1).sum(1)


def product_sq_distance(new: LoRA, old: LoRA | None = None) -> Tensor:
    """Per sample, sum over targets of ||s B_new A_new - s B_old A_old||_F^2 (old None: the zero update).

    Compares the updates the factors make, not the factors: (B Q)(Q^-1 A) is the same update.
    Shape: (n,).
    """
    total = 0.0
    for name, (a, b) in new.factors.items():
        d = _inner(b, a, b, a) * new.scale ** 2
        if old is not None:
            a_old, b_old = old.factors[name]
            d = (d - 2 * new.scale * old.scale * _inner(b, a, b_old, a_old)
                 + old.scale ** 2 * _inner(b_old, a_old, b_old, a_old))
        total = total + d
    return total.clamp(min=0)


class ConditionStore:
    """Condition vectors (the generator's input) of a few earlier training instances, with their edit
    ids; float16, no images. ``nbytes`` is what keeping it costs."""

    def __init__(self):
        self.conditions: Tensor | None = None  # (n, L, condition_dim) float16
        self.edit_ids: Tensor | None = None  # (n,) uint8

    def __len__(self) -> int:
        return 0 if self.conditions is None else len(self.conditions)

    def add(self, conditions: Tensor, edit_ids: Tensor) -> None:
        conditions, edit_ids = conditions.detach().half(), edit_ids.to(torch.uint8)
        if self.conditions is None:
            self.conditions, self.edit_ids = conditions, edit_ids
        else:
            self.conditions = torch.cat([self.conditions, conditions])
            self.edit_ids = torch.cat([self.edit_ids, edit_ids])

    def tensors(self) -> dict[str, Tensor]:
        return {} if self.conditions is None else {"conditions": self.conditions, "edit_ids": self.edit_ids}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


@torch.no_grad()
def generate_all(memory, conditions: Tensor, chunk: int = 64) -> LoRA:
    """The memory's LoRA for stored conditions (float16 -> float32), detached."""
    dev = next(memory.fm.generator.parameters()).device
    return LoRA.cat([memory.fm.generate(conditions[i:i + chunk].float().to(dev)).detach()
                     for i in range(0, len(conditions), chunk)])


class ReplayLoss:
    """Image MSE on the current stage + ``weight`` x functional distillation on stored conditions.

    The distillation target is the previous generator's update for every stored condition, computed
    once when the stage starts; the distance is normalised by the targets' mean squared norm.
    """

    def __init__(self, memory, store: ConditionStore, weight: float, batch: int, seed: int):
        self.store, self.weight, self.batch = store, weight, batch
        self.old = generate_all(memory, store.conditions)
        self.norm = product_sq_distance(self.old).mean().clamp(min=1e-12)
        self.rng = torch.Generator().manual_seed(seed)

    def __call__(self, method, batch: dict):
        task = mse_loss(method, batch)
        idx = torch.randint(len(self.store), (self.batch,), generator=self.rng)
        new = method.fm.generate(self.store.conditions[idx].float().to(batch["inputs"].device))
        distill = product_sq_distance(new, self.old[idx]).mean() / self.norm
        return task + self.weight * distill, {"task": task.detach(), "distill": distill.detach()}


# ------------------------------------------------------------------ methods, as learners


def _float_bytes(*modules) -> int:
    """float32 bytes of the modules' parameters, trainable or frozen."""
    return 4 * sum(p.numel() for m in modules for p in m.parameters())


class SequentialShared:
    """``shared_lora_sequential``: one LoRA, fine-tuned stage after stage."""

    def __init__(self, editor, cfg: ContinualConfig):
        torch.manual_seed(cfg.seed)
        self.method = Shared(editor, cfg.targets, cfg.rank, cfg.alpha).to(cfg.device)
        self.cfg = cfg

    def learn(self, k: int, data: EditSet, name: str) -> None:
        train(self.method, data, CONDITION, self.cfg.benchmark_config(), self.cfg.lr_lora, self.cfg.seed * 100 + k, name)

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
        torch.manual_seed(cfg.seed)
        self.method = StageLoRAs(editor, cfg.targets, cfg.rank, cfg.alpha, cfg.groups).to(cfg.device)
        self.cfg = cfg

    def learn(self, k: int, data: EditSet, name: str) -> None:
        factors = [*self.method.lora_A.values(), *self.method.lora_B.values()]
        only_k = lambda grad: grad * (torch.arange(len(grad), device=grad.device) == k).view(-1, *[1] * (grad.dim() - 1))
        hooks = [p.register_hook(only_k) for p in factors]  # the other stages' rows get no gradient: AdamW
        try:  # (fresh each stage, no weight decay) leaves them exactly as they are
            train(self.method, data, CONDITION, self.cfg.benchmark_config(), self.cfg.lr_lora, self.cfg.seed * 100 + k,
                  name)
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
        self.method = make_memory(editor, first_train_raw, raw_dims, cfg.benchmark_config(), cfg.seed)
        self.cfg, self.replay = cfg, replay
        self.store = ConditionStore()
        self.history: list[list[dict]] = []

    def learn(self, k: int, data: EditSet, name: str) -> None:
        cfg = self.cfg
        loss_fn = mse_loss
        if self.replay and len(self.store):
            loss_fn = ReplayLoss(self.method, self.store, cfg.distill_weight, cfg.replay_batch, cfg.seed * 100 + k)
        self.history.append(train(self.method, data, CONDITION, cfg.benchmark_config(), cfg.lr_generator,
                                  cfg.seed * 100 + k, name, loss_fn=loss_fn))
        if k == 0:  # stored condition vectors must stay the generator's input for their instance
            self.method.projector.requires_grad_(False)
        if self.replay:
            self.remember(data)

    @torch.no_grad()
    def remember(self, data: EditSet) -> None:
        """Store the condition vectors of the first ``store_per_edit`` training instances of each edit."""
        ids = data.edit_ids.cpu()
        idx = torch.cat([(ids == e).nonzero().flatten()[:self.cfg.store_per_edit] for e in ids.unique().tolist()])
        batch = data.batch(idx.to(data.edit_ids.device), CONDITION)
        self.store.add(self.method.condition(batch).cpu(), batch["edit_ids"].cpu())

    def storage(self) -> dict:
        m = self.method
        return {"weights": _float_bytes(m.projector, m.fm.generator), "store": self.store.nbytes}


# ------------------------------------------------------------------ removing an edit


def forget_edit(memory, store: ConditionStore, edit_id: int, cfg: ContinualConfig) -> list[dict]:
    """Fine-tune the generator so that ``edit_id``'s stored conditions yield a zero update, while every
    other stored condition keeps the update it has now. Uses the store only (no images)."""
    removed = (store.edit_ids == edit_id).nonzero().flatten()
    kept = (store.edit_ids != edit_id).nonzero().flatten()
    if not len(removed):
        raise ValueError(f"the condition store holds no condition of edit {EDIT_NAMES[edit_id]!r}")
    old = generate_all(memory, store.conditions)
    norm = product_sq_distance(old).mean().clamp(min=1e-12)
    device = next(memory.fm.generator.parameters()).device

    def batch_fn(step: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        pick = lambda pool: pool[torch.randint(len(pool), (cfg.replay_batch,), generator=g)]
        return pick(kept), pick(removed)

    def loss_fn(method, batch):
        keep_idx, removed_idx = batch
        new_keep = method.fm.generate(store.conditions[keep_idx].float().to(device))
        new_removed = method.fm.generate(store.conditions[removed_idx].float().to(device))
        keep = product_sq_distance(new_keep, old[keep_idx]).mean() / norm if len(kept) else torch.zeros((), device=device)
        zero = product_sq_distance(new_removed).mean() / norm
        return keep + zero, {"keep": keep.detach(), "zero": zero.detach()}

    trainer = Trainer(memory, loss_fn, TrainConfig(steps=cfg.forget_steps, lr=cfg.forget_lr, grad_clip=1.0,
                                                   warmup_steps=max(1, cfg.forget_steps // 20),
                                                   description=f"forget {EDIT_NAMES[edit_id]}",
                                                   log_every=max(1, cfg.forget_steps // 20)))
    trainer.fit(batch_fn)
    memory.eval()
    return trainer.history


def subset(sets: list[EditSet], keep) -> EditSet:
    """The examples of several sets for which ``keep(edit_ids)`` is true, as one set."""
    parts = []
    for s in sets:
        idx = keep(s.edit_ids).nonzero().flatten()
        parts.append((s, idx))
    cat = lambda get: torch.cat([get(s)[i] for s, i in parts])
    examples = {"inputs": cat(lambda s: s.inputs), "targets": cat(lambda s: s.targets),
                "edit_ids": cat(lambda s: s.edit_ids),
                "instructions": [s.instructions[j] for s, i in parts for j in i.tolist()]}
    raw = {name: {k: torch.cat([s.raw[name][k][i] for s, i in parts]) for k in parts[0][0].raw[name]}
           for name in parts[0][0].raw}
    return EditSet(examples, cat(lambda s: s.text_states), cat(lambda s: s.text_mask), raw)


@torch.no_grad()
def psnr_to_base(memory, editor, data: EditSet) -> float:
    """Mean PSNR between the memory's output and the base editor's (high: the update is near zero)."""
    memory.eval()
    base = Base(editor)
    values = [psnr(memory.predict(b), base.predict(b).clamp(0, 1)) for b in data.chunks(CONDITION)]
    return torch.cat(values).mean().item()


def forget_experiment(learner: GeneratorLearner, editor, test_sets: list[EditSet], edit: str,
                      cfg: ContinualConfig) -> dict:
    """Remove ``edit`` from a trained ``fm_replay`` learner and measure both sides."""
    if edit not in EDIT_NAMES:
        raise ValueError(f"unknown edit {edit!r}; edits: {EDIT_NAMES}")
    e = EDIT_NAMES.index(edit)
    removed_set = subset(test_sets, lambda ids: ids == e)
    kept_set = subset(test_sets, lambda ids: ids != e)
    if not len(removed_set):
        raise ValueError(f"edit {edit!r} is in no stage of this run ({cfg.groups})")
    memory = learner.method
    before = {"to_base": psnr_to_base(memory, editor, removed_set),
              "removed": evaluate(memory, removed_set, CONDITION, EDIT_NAMES)["psnr"],
              "kept": evaluate(memory, kept_set, CONDITION, EDIT_NAMES)}
    start = time.perf_counter()
    history = forget_edit(memory, learner.store, e, cfg)
    seconds = time.perf_counter() - start
    kept_after = evaluate(memory, kept_set, CONDITION, EDIT_NAMES)
    return {"edit": edit, "removed_psnr_to_base": psnr_to_base(memory, editor, removed_set),
            "removed_psnr_to_base_before": before["to_base"],
            "removed_psnr_to_target_before": before["removed"],
            "removed_psnr_to_target_after": evaluate(memory, removed_set, CONDITION, EDIT_NAMES)["psnr"],
            "base_psnr_removed": evaluate(Base(editor), removed_set, CONDITION, EDIT_NAMES)["psnr"],
            "kept_psnr_before": before["kept"]["psnr"], "kept_psnr_after": kept_after["psnr"],
            "kept_per_edit_before": {k: v["psnr"] for k, v in before["kept"]["per_task"].items()},
            "kept_per_edit_after": {k: v["psnr"] for k, v in kept_after["per_task"].items()},
            "store_conditions_used": len(learner.store), "steps": cfg.forget_steps, "seconds": round(seconds, 1),
            "final_losses": history[-1] if history else {}}


# ------------------------------------------------------------------ the protocol


@dataclass
class Stage:
    name: str
    edits: list
    train: EditSet
    test: EditSet


def make_stages(cfg: ContinualConfig, text_encoder: TextEncoder, encoder, editor_cfg: EditorConfig) -> list[Stage]:
    """Per group: its own train / test examples (test photos held out), edit ids global (``EDIT_NAMES``)."""
    unknown = [e for edits in cfg.groups.values() for e in edits if e not in EDIT_NAMES]
    if unknown:
        raise ValueError(f"unknown edits {unknown}; edits: {EDIT_NAMES}")
    train_photos, test_photos = photo_split(cfg.images, cfg.data_seed)
    stages = []
    for k, (name, edits) in enumerate(cfg.groups.items()):
        global_ids = torch.tensor([EDIT_NAMES.index(e) for e in edits])
        sets = []
        for split, photos, n, seed in (("train", train_photos, cfg.train_per_group, cfg.data_seed + 2 * k),
                                       ("test", test_photos, cfg.test_per_group, cfg.data_seed + 2 * k + 1)):
            ex = make_examples(photos, edits, n, cfg.size, split, seed)
            ex["edit_ids"] = global_ids[ex["edit_ids"]]
            sets.append(build_set(ex, text_encoder, {CONDITION: encoder}, editor_cfg, cfg.device))
        stages.append(Stage(name, list(edits), *sets))
    return stages


def make_learners(editor, encoder, stages: list[Stage], cfg: ContinualConfig, methods=METHODS) -> dict:
    makers = {"shared_lora_sequential": lambda: SequentialShared(editor, cfg),
              "per_task_lora": lambda: PerStage(editor, cfg),
              "fm_naive": lambda: GeneratorLearner(editor, encoder.raw_dims, stages[0].train.raw[CONDITION], cfg, False),
              "fm_replay": lambda: GeneratorLearner(editor, encoder.raw_dims, stages[0].train.raw[CONDITION], cfg, True)}
    unknown = [m for m in methods if m not in makers]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; methods: {list(makers)}")
    return {m: makers[m]() for m in methods}


def run(cfg: ContinualConfig, out: str | Path, forget: str | None = None, methods=METHODS,
        progress: bool = True) -> dict:
    """The whole protocol; writes ``continual.json``, ``continual.png`` and ``continual.md`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if forget is not None and "fm_replay" not in methods:
        raise ValueError("--forget removes an edit from the fm_replay generator: keep fm_replay in the methods")
    if forget is not None and forget not in EDIT_NAMES:
        raise ValueError(f"unknown edit {forget!r}; edits: {EDIT_NAMES}")
    timer, start = Timer(), time.perf_counter()
    torch.manual_seed(cfg.data_seed)
    with timer.stage("base_editor"):
        text_encoder = TextEncoder()
        editor_cfg = EditorConfig.from_dict({**cfg.editor, "image_size": cfg.size})
        editor = load_or_train_editor(editor_cfg, cfg.cache_dir, steps=cfg.editor_steps, text_encoder=text_encoder,
                                      progress=progress).to(cfg.device)
    with timer.stage("data_and_features"):
        encoder = MiniLMEfficientNet(text_encoder)
        stages = make_stages(cfg, text_encoder, encoder, editor_cfg)
    learners = make_learners(editor, encoder, stages, cfg, methods)
    T = len(stages)
    matrices = {m: [[None] * T for _ in range(T)] for m in learners}
    storage = {m: [] for m in learners}
    for k, stage in enumerate(stages):
        for m, learner in learners.items():
            with timer.stage(m):
                learner.learn(k, stage.train, f"{m}: stage {stage.name}")  # stage k's data only
                for j in range(k + 1):
                    matrices[m][k][j] = evaluate(learner.method, stages[j].test, CONDITION, EDIT_NAMES)["psnr"]
            storage[m].append(learner.storage())
    base = [evaluate(Base(editor), s.test, CONDITION, EDIT_NAMES)["psnr"] for s in stages]
    results = {"config": asdict(cfg), "stages": [{"name": s.name, "edits": s.edits, "train_examples": len(s.train),
                                                  "test_examples": len(s.test)} for s in stages],
               "base_psnr": base, "methods": {}}
    for m in learners:
        final = storage[m][-1]
        results["methods"][m] = {"matrix": matrices[m], **summarize(matrices[m]),
                                 "storage_bytes": final["weights"] + final["store"], "storage": final,
                                 "storage_bytes_by_stage": [s["weights"] + s["store"] for s in storage[m]]}
    if "fm_replay" in learners:
        store = learners["fm_replay"].store
        results["methods"]["fm_replay"]["store"] = {
            "conditions": len(store), "bytes": store.nbytes, "shape": list(store.conditions.shape),
            "dtype": str(store.conditions.dtype).replace("torch.", ""), "per_edit": cfg.store_per_edit}
    if forget is not None:
        with timer.stage("forget"):
            results["forget"] = forget_experiment(learners["fm_replay"], editor, [s.test for s in stages], forget, cfg)
    results["timing"] = {**timer.seconds, "total": round(time.perf_counter() - start, 1)}
    io.write_json(out / "continual.json", results)
    plot(results, out / "continual.png")
    (out / "continual.md").write_text(report(results))
    return results


# ------------------------------------------------------------------ pictures and report

LABELS = {"shared_lora_sequential": "shared LoRA, sequential", "per_task_lora": "LoRA per stage (oracle label)",
          "fm_naive": "generator, naive fine-tune", "fm_replay": "generator + functional distillation"}


def plot(results: dict, path: Path) -> None:
    """Per method: each group's test PSNR after every stage (dashed: the base editor on that group)."""
    from .report import _plt

    plt = _plt()
    methods, stages = results["methods"], [s["name"] for s in results["stages"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (m, r) in zip(axes[0], methods.items()):
        for j, group in enumerate(stages):
            xs = list(range(j, len(stages)))
            ax.plot(xs, [r["matrix"][i][j] for i in xs], "o-", color=colours[j % len(colours)], label=f"group {group}")
            ax.axhline(results["base_psnr"][j], color=colours[j % len(colours)], ls="--", lw=0.8)
        ax.set_xticks(range(len(stages)), [f"after {s}" for s in stages], fontsize=8)
        ax.set_title(f"{LABELS.get(m, m)}\nforgetting {r['mean_forgetting']:.2f} dB", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test PSNR (dB); dashed: base editor")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def report(results: dict) -> str:
    """``continual.md``: the run's continual-learning section."""
    stages = [s["name"] for s in results["stages"]]
    groups = ", ".join(f"{s['name']} = {' / '.join(s['edits'])}" for s in results["stages"])
    lines = ["## Continual learning", "",
             f"Groups taught one after another, each stage seeing only its own data: {groups}. "
             f"{results['config']['steps']} steps per stage and method, batch {results['config']['batch']}. "
             "PSNR (dB) on each group's held-out test examples after every stage; forgetting = best minus final "
             "PSNR per earlier group (mean), BWT = mean final minus just-learnt PSNR over earlier groups.", "",
             "| method | average PSNR | forgetting | BWT | storage |", "|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        st = r["storage"]
        extra = f" (weights {_kib(st['weights'])} + store {_kib(st['store'])})" if st["store"] else ""
        lines.append(f"| {LABELS.get(m, m)} | {r['average']:.2f} | {r['mean_forgetting']:.2f} | "
                     f"{r['backward_transfer']:+.2f} | {_kib(r['storage_bytes'])}{extra} |")
    lines += ["", f"Base editor alone: {', '.join(f'{g} {p:.2f}' for g, p in zip(stages, results['base_psnr']))}.", ""]
    for m, r in results["methods"].items():
        lines += [f"**{LABELS.get(m, m)}** (rows: after stage; columns: group)", "",
                  "| after | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        for i, row in enumerate(r["matrix"]):
            lines.append(f"| {stages[i]} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    if "store" in results["methods"].get("fm_replay", {}):
        s = results["methods"]["fm_replay"]["store"]
        lines += [f"The replay store holds {s['conditions']} condition vectors ({s['per_edit']} per edit, shape "
                  f"{s['shape']}, {s['dtype']}) and their edit ids: {s['bytes']:,} bytes; no images.", ""]
    if "forget" in results:
        f = results["forget"]
        lines += ["### Removing an edit", "",
                  f"`--forget {f['edit']}`: {f['steps']} steps on the {f['store_conditions_used']} stored conditions "
                  "only. "
                  f"The removed edit's output vs the base editor's: {f['removed_psnr_to_base_before']:.2f} dB before, "
                  f"**{f['removed_psnr_to_base']:.2f} dB** after (higher = closer to no update); its PSNR to its "
                  f"own target {f['removed_psnr_to_target_before']:.2f} -> {f['removed_psnr_to_target_after']:.2f} dB "
                  f"(base editor: {f['base_psnr_removed']:.2f}). The other edits: {f['kept_psnr_before']:.2f} -> "
                  f"{f['kept_psnr_after']:.2f} dB.", ""]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in results["timing"].items() if k != "total")
    lines += ["![per-group PSNR across stages](continual.png)", "",
              f"Wall time {results['timing']['total']:.0f} s ({parts}).", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ command line


def cmd_continual(args) -> int:
    overrides = {"images": args.images, "device": args.device, "cache_dir": args.cache_dir}
    if args.steps:
        overrides["steps"] = args.steps
    if args.distill_weight is not None:
        overrides["distill_weight"] = args.distill_weight
    cfg = ContinualConfig.quick(**overrides) if args.quick else ContinualConfig(**overrides)
    results = run(cfg, args.out, forget=args.forget, methods=args.methods)
    for m, r in results["methods"].items():
        print(f"{m:24s} average {r['average']:6.2f} dB  forgetting {r['mean_forgetting']:5.2f}  "
              f"BWT {r['backward_transfer']:+6.2f}  storage {r['storage_bytes']:,} B")
    if "forget" in results:
        f = results["forget"]
        print(f"forget {f['edit']}: removed vs base {f['removed_psnr_to_base_before']:.2f} -> "
              f"{f['removed_psnr_to_base']:.2f} dB; "
              f"kept {f['kept_psnr_before']:.2f} -> {f['kept_psnr_after']:.2f} dB")
    print(f"report: {Path(args.out) / 'continual.md'}")
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("continual", help="continual learning: edit groups taught one after another, "
                              "forgetting measured; optionally remove one edit (--forget)")
    p.add_argument("--quick", action="store_true", help="under 10 minutes on 2 CPU cores")
    p.add_argument("--out", default="runs/continual")
    p.add_argument("--forget", default=None, metavar="EDIT", choices=EDIT_NAMES,
                   help="afterwards, remove this edit from the fm_replay generator (stored conditions only)")
    p.add_argument("--steps", type=int, default=None, help="override the steps per stage")
    p.add_argument("--distill-weight", type=float, default=None, help="fm_replay's distillation weight")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="which methods to run")
    p.add_argument("--images", default=None, help="a folder of JPEG/PNG photos to use instead of the bundled ones")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cache-dir", default=None, help="where the pretrained base editor is cached")
    p.set_defaults(func=cmd_continual)
