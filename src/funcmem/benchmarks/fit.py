"""``funcmem bench fit``: does a generator told the task fit as well as a bank of per-task LoRAs?

K tasks on one small frozen base (``toy.ToyMLP``). Task k's target function is the base with a
rank-r LoRA update ``B_k A_k`` on every target; tasks come in opposite pairs (``+B_k A_k`` and
``-B_k A_k``), so no static LoRA serves both. Training targets carry Gaussian noise of known
variance (the *floor*: no model beats it on fresh data), so losses are never a ratio of two
near-zero numbers.

    task k -> condition (one-hot label, or a fixed random embedding) -> generator -> LoRA
    task k -> index                                                  -> LoRABank[k]

Both get the same base, targets, rank, training inputs, batches, steps, AdamW and schedule (each
its own peak learning rate, printed). Reported per model, averaged over seeds:

- ``train_loss``: MSE on the whole (noisy) training set after training; ``test_loss``: on fresh
  inputs with fresh noise;
- ``train_excess`` / ``test_excess``: MSE against the noise-free teacher (loss minus the floor,
  measured without the noise);
- generator / bank ratios of all four; parameter counts (generator, its trunk = the format's generator
  of the same size, the bank); seconds per training step.

Baselines: the frozen base (no LoRA) and the oracle (the teacher's own LoRA: its loss is the floor).
A further row (unless ``--no-warm-start``) is a generator first distilled from the trained bank
(``funcmem.warm_start``: 500 AdamW steps at lr 1e-2 matching its updates B A on the task keys, timed as
``distill_seconds``), then trained end to end for the same number of steps: it costs the bank's
training besides its own.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..generator import GeneratorConfig
from ..io import write_json
from ..bank import LoRABank
from ..memory import FunctionalMemory
from ..toy import ToyMLP
from ..train import Trainer, TrainConfig

TARGETS = ["fc1", "fc2"]


@dataclass
class FitConfig:
    """One fit-parity measurement (saved beside the results).

    Args:
        tasks: K (even: opposite pairs).
        dim, depth: the base ``ToyMLP`` (depth = base layers N that receive LoRA).
        rank, alpha: LoRA rank and alpha, for the teacher, the bank and the generator.
        strength: size of the teacher updates (RMS of ``B_k A_k x`` relative to ``x``, roughly).
        noise: floor as a fraction of the base's mean squared error to the teachers.
        train_per_task, test_per_task: inputs per task in the training / held-out set.
        steps, batch: optimisation steps and batch size (batches drawn from the training set).
        lr_bank, lr_generator: peak AdamW learning rates.
        condition: "onehot" (the label) or "embedding" (a fixed random vector per task).
        condition_dim: width of the random embeddings.
        generator: ``GeneratorConfig`` fields.
        seeds: one run per seed (base, teachers, data and inits all follow from it).
        warm_start: also train a generator warm-started from the trained bank.
        warm_start_steps, warm_start_lr: its distillation (``funcmem.warm_start.warm_start``).

    The default generator carries an 11-LoRA basis (``GeneratorConfig.basis``): with 12 tasks it
    stays within the parameter budget (bank + the format's trunk); 12 would exceed it by the
    mixing layer.
    """

    tasks: int = 12
    dim: int = 64
    depth: int = 4
    rank: int = 4
    alpha: float = 4.0
    strength: float = 1.0
    noise: float = 0.05
    train_per_task: int = 256
    test_per_task: int = 256
    steps: int = 1500
    batch: int = 32
    lr_bank: float = 3e-3
    lr_generator: float = 1e-3
    condition: str = "onehot"
    condition_dim: int = 16
    generator: dict = field(default_factory=lambda: GeneratorConfig(d_model=96, depth=2, head_dim=16, dim_accumulation=4,
                                                                     basis=11).to_dict())
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    warm_start: bool = True
    warm_start_steps: int = 500
    warm_start_lr: float = 1e-2

    @classmethod
    def quick(cls, **overrides) -> "FitConfig":
        """About a minute on one CPU thread."""
        return cls(**{**dict(steps=500, seeds=[0]), **overrides})

    def __post_init__(self):
        if self.tasks < 2 or self.tasks % 2:
            raise ValueError(f"tasks must be even and >= 2 (they come in opposite pairs), got {self.tasks}")
        if self.condition not in ("onehot", "embedding"):
            raise ValueError(f"condition must be 'onehot' or 'embedding', got {self.condition!r}")


class FitTasks:
    """The tasks of one seed: teachers, conditions, a training and a held-out set.

    Attributes:
        teacher: ``LoRABank`` on a copy of the base holding the K teacher LoRAs.
        conditions: (K, 1, cond_dim) the generator's condition per task.
        train, test: dicts with ``task`` (n,), ``x`` (n, dim), ``clean`` (n, dim) (teacher output)
            and ``y`` (n, dim) (clean + noise).
        floor: the noise variance, the held-out loss of the teacher itself.
        base_loss: the frozen base's mean squared error to the clean teacher outputs (held out).
    """

    def __init__(self, cfg: FitConfig, base: ToyMLP, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.cfg, k = cfg, cfg.tasks
        self.teacher = LoRABank(copy.deepcopy(base), TARGETS, cfg.rank, cfg.alpha, num=k)
        with torch.no_grad():
            for t in self.teacher.targets:
                key = t.name.replace(".", "__")
                a = torch.randn(k // 2, cfg.rank, t.in_features, generator=g) / t.in_features ** 0.5
                b = torch.randn(k // 2, t.out_features, cfg.rank, generator=g) * cfg.strength / cfg.rank ** 0.5
                self.teacher.lora_A[key].copy_(a.repeat_interleave(2, 0))
                self.teacher.lora_B[key].copy_(torch.stack([b, -b], 1).flatten(0, 1))  # opposite pairs
        self.conditions = (torch.eye(k) if cfg.condition == "onehot"
                           else torch.randn(k, cfg.condition_dim, generator=g))[:, None]
        self.train = self._split(cfg.train_per_task, g)
        self.test = self._split(cfg.test_per_task, g)
        with torch.no_grad():
            base_err = ((self.teacher.base(self.test["x"]) - self.test["clean"]) ** 2).mean().item()
        self.floor = cfg.noise * base_err
        self.base_loss = base_err
        for split in (self.train, self.test):
            split["y"] = split["clean"] + self.floor ** 0.5 * torch.randn(split["clean"].shape, generator=g)

    @torch.no_grad()
    def _split(self, per_task: int, g: torch.Generator) -> dict:
        task = torch.arange(self.cfg.tasks).repeat_interleave(per_task)
        x = torch.randn(len(task), self.cfg.dim, generator=g)
        return {"task": task, "x": x, "clean": self.teacher(task, x)}

    def batch(self, step: int, seed: int) -> dict:
        """Training batch ``step``: the same for every model of this seed."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(len(self.train["task"]), (self.cfg.batch,), generator=g)
        return {k: v[idx] for k, v in self.train.items()}


# ---------------------------------------------------------------- models


def generator_loss(conditions: Tensor):
    """The generator's MSE, its condition looked up by each sample's task."""
    def loss(module: FunctionalMemory, batch: dict) -> Tensor:
        return ((module(conditions[batch["task"]], batch["x"]) - batch["y"]) ** 2).mean()
    return loss


def bank_loss(bank: LoRABank, batch: dict) -> Tensor:
    return ((bank(batch["task"], batch["x"]) - batch["y"]) ** 2).mean()


@torch.no_grad()
def predict(model, tasks: FitTasks, split: dict, chunk: int = 1024) -> Tensor:
    outs = []
    for s in range(0, len(split["task"]), chunk):
        task, x = split["task"][s:s + chunk], split["x"][s:s + chunk]
        if isinstance(model, FunctionalMemory):
            outs.append(model(tasks.conditions[task], x))
        elif isinstance(model, LoRABank):
            outs.append(model(task, x))
        else:  # the frozen base
            outs.append(model(x))
    return torch.cat(outs)


def scores(model, tasks: FitTasks) -> dict:
    was_training = model.training
    model.eval()
    out = {}
    for name, split in (("train", tasks.train), ("test", tasks.test)):
        pred = predict(model, tasks, split)
        out[f"{name}_loss"] = ((pred - split["y"]) ** 2).mean().item()
        out[f"{name}_excess"] = ((pred - split["clean"]) ** 2).mean().item()
    if was_training:
        model.train()
    return out


def _train(module, loss_fn, batches, cfg: FitConfig, lr: float, name: str) -> tuple[float, list[dict]]:
    trainer = Trainer(module, loss_fn, TrainConfig(steps=cfg.steps, lr=lr, warmup_steps=max(1, cfg.steps // 20),
                                                   grad_clip=1.0, progress=False, description=name,
                                                   log_every=max(1, cfg.steps // 10), precision="fp32",
                                                   distributed="none"))
    start = time.perf_counter()
    history = trainer.fit(batches)
    return (time.perf_counter() - start) / cfg.steps, history


def make_generator(cfg: FitConfig, base: ToyMLP, cond_dim: int) -> FunctionalMemory:
    return FunctionalMemory(base, TARGETS, cfg.rank, cfg.alpha, cond_dim, GeneratorConfig.from_dict(cfg.generator))


def run_seed(cfg: FitConfig, seed: int) -> dict:
    """Bank and generator (and the baselines) on one seed's tasks."""
    torch.manual_seed(seed)
    base = ToyMLP(cfg.dim, cfg.depth)
    tasks = FitTasks(cfg, base, seed)
    batches = lambda step: tasks.batch(step, seed)  # noqa: E731
    rows = {"base": scores(tasks.teacher.base, tasks), "oracle": scores(tasks.teacher, tasks)}

    torch.manual_seed(seed)
    bank = LoRABank(copy.deepcopy(base), TARGETS, cfg.rank, cfg.alpha, num=cfg.tasks)
    sps, _ = _train(bank, bank_loss, batches, cfg, cfg.lr_bank, "bank")
    rows["bank"] = {**scores(bank, tasks), "s_per_step": sps, "params": bank.num_trainable_parameters()}

    torch.manual_seed(seed)
    fm = make_generator(cfg, copy.deepcopy(base), tasks.conditions.shape[-1])
    sps, history = _train(fm, generator_loss(tasks.conditions), batches, cfg, cfg.lr_generator, "generator")
    rows["generator"] = {**scores(fm, tasks), "s_per_step": sps, **_generator_params(fm),
                         "routing_margin": history[-1].get("routing_margin")}

    if cfg.warm_start:
        from ..warm_start import warm_start

        torch.manual_seed(seed)
        warm = make_generator(cfg, copy.deepcopy(base), tasks.conditions.shape[-1])
        start = time.perf_counter()
        distilled = warm_start(warm, bank, tasks.conditions, steps=cfg.warm_start_steps, lr=cfg.warm_start_lr,
                               seed=seed)
        distill_s = time.perf_counter() - start
        sps, _ = _train(warm, generator_loss(tasks.conditions), batches, cfg, cfg.lr_generator, "warm")
        rows["generator_warm_start"] = {**scores(warm, tasks), "s_per_step": sps, "distill_seconds": distill_s,
                                        "distill_relative_error": distilled["relative_error"],
                                        **_generator_params(warm)}
    return {"seed": seed, "floor": tasks.floor, "base_loss": tasks.base_loss, "models": rows}


def _generator_params(fm: FunctionalMemory) -> dict:
    total, trunk = fm.num_trainable_parameters(), fm.generator.count_trunk_parameters()
    return {"params": total, "trunk_params": trunk, "design_params": total - trunk}


# ---------------------------------------------------------------- summary


def summarize(cfg: FitConfig, runs: list[dict]) -> dict:
    """Means over seeds, generator / bank ratios and the parameter budget."""
    mean = lambda xs: statistics.mean(xs) if xs else None  # noqa: E731
    names = list(runs[0]["models"])
    models = {m: {k: mean([r["models"][m][k] for r in runs if r["models"][m].get(k) is not None])
                  for k in runs[0]["models"][m]} for m in names}
    ratios = {}
    for gen in [m for m in names if m.startswith("generator")]:
        ratios[gen] = {k: models[gen][k] / models["bank"][k]
                       for k in ("train_loss", "test_loss", "train_excess", "test_excess", "s_per_step")}
    bank, gen = models["bank"], models["generator"]
    budget = {"generator_params": gen["params"], "bank_params": bank["params"], "trunk_params": gen["trunk_params"],
              "within_budget": gen["params"] <= bank["params"] + gen["trunk_params"]}
    parity = {gen: {k: r[k] <= 1.1 for k in ("train_loss", "test_loss")} for gen, r in ratios.items()}
    return {"config": asdict(cfg), "floor": mean([r["floor"] for r in runs]),
            "base_loss": mean([r["base_loss"] for r in runs]), "models": models, "ratios": ratios,
            "budget": budget, "parity_1.1x": parity, "runs": runs}


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"fit parity: {cfg['tasks']} tasks in opposite pairs, rank {cfg['rank']}, {cfg['steps']} steps, "
             f"batch {cfg['batch']}, {cfg['condition']} condition, seeds {cfg['seeds']}",
             f"noise floor {result['floor']:.4g} (frozen base's loss {result['base_loss']:.4g})", "",
             f"{'model':22s} {'train loss':>11s} {'test loss':>11s} {'train excess':>13s} {'test excess':>12s} "
             f"{'params':>9s} {'ms/step':>8s}"]
    for name, m in result["models"].items():
        params = f"{m['params']:,}" if m.get("params") else "-"
        ms = f"{1000 * m['s_per_step']:.1f}" if m.get("s_per_step") else "-"
        lines.append(f"{name:22s} {m['train_loss']:11.4g} {m['test_loss']:11.4g} {m['train_excess']:13.4g} "
                     f"{m['test_excess']:12.4g} {params:>9s} {ms:>8s}")
    lines.append("")
    for name, r in result["ratios"].items():
        lines.append(f"{name} / bank: loss train {r['train_loss']:.3f}, test {r['test_loss']:.3f}; excess train "
                     f"{r['train_excess']:.2f}, test {r['test_excess']:.2f}; time per step {r['s_per_step']:.1f}x")
    b = result["budget"]
    lines.append(f"parameters: generator {b['generator_params']:,} (trunk {b['trunk_params']:,}), bank "
                 f"{b['bank_params']:,}: generator {'<=' if b['within_budget'] else '>'} bank + trunk")
    for gen, p in result["parity_1.1x"].items():
        lines.append(f"{gen} loss <= 1.1x the bank's: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in p.items()))
    return "\n".join(lines)


def run(cfg: FitConfig, out: str | Path | None = None) -> dict:
    runs = [run_seed(cfg, seed) for seed in cfg.seeds]
    result = summarize(cfg, runs)
    if out is not None:
        write_json(out, result)
    return result


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps (about a minute on one thread)")
    parser.add_argument("--out", default="runs/bench/fit.json")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--condition", choices=["onehot", "embedding"], default=None)
    parser.add_argument("--lr-generator", type=float, default=None)
    parser.add_argument("--lr-bank", type=float, default=None)
    parser.add_argument("--generator", default=None, help='GeneratorConfig fields as JSON, e.g. \'{"depth": 3}\'')
    parser.add_argument("--no-warm-start", dest="warm_start", action="store_false",
                        help="skip the row of a generator distilled from the trained bank before training")
    return parser


def run_cli(args) -> int:
    overrides = {k: v for k, v in dict(steps=args.steps, seeds=args.seeds, condition=args.condition,
                                       lr_generator=args.lr_generator, lr_bank=args.lr_bank).items() if v is not None}
    overrides["warm_start"] = args.warm_start
    cfg = FitConfig.quick(**overrides) if args.quick else FitConfig(**overrides)
    if args.generator:
        cfg.generator = GeneratorConfig.from_dict({**cfg.generator, **json.loads(args.generator)}).to_dict()
    result = run(cfg, args.out)
    print(format_table(result))
    print(f"\nwrote {args.out}")
    return 0
