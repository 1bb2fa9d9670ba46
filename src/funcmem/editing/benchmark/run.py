"""The editing benchmark: every method trained on the same data, steps, batch and seeds, then
evaluated and analysed. ``run(config, out)`` writes ``results.json`` and the run directory
(``editing.rundir``); ``report.write_report`` adds the pictures and ``report.md``.

Data flow:

    photos (wheels or --images) -> split by photo -> task examples (``tasks``): "train" on the train
    photos, each of ``tasks.EVAL_SPLITS`` on the test photos
    -> frozen features once: MiniLM token states (the editor reads them) + raw condition streams
    -> identity and the base evaluated; each row of ``methods_table`` built, trained by
       funcmem.train.Trainer, evaluated on every split (``eval[split][method]``, see ``evaluate``)
    -> analyses of the first seed's methods
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from ... import io
from .. import rundir
from ..conditions import TextEncoder, make_encoder
from ..data import manifest
from ..editor import EditorConfig
from ..methods import Bank, Base, Identity, Shared
from ..ops import FAMILY
from ..pretrain import NEUTRAL, load_or_train_editor
from . import analysis
from .config import BenchmarkConfig
from .evaluate import evaluate, mean_over_seeds
from .sets import EditSet, build_set, photo_split, task_examples
from .training import Timer, make_memory, matched_rank, train, warm_start_from_bank

METHODS = ("identity", "base", "shared_lora", "shared_lora_matched", "per_task_lora", "retrieval_lora", "lora_sum",
           "functional_memory")
"""The order results list methods in (then ``functional_memory[condition]`` for further conditions)."""
COMPOSITIONS = "held_out_compositions"
ONLY_ON = {"lora_sum": (COMPOSITIONS,)}  # a method reported on some splits only (elsewhere it is per_task_lora)


@dataclass
class Context:
    """What every method of a run shares: settings, the frozen editor, the sets and their features."""

    cfg: BenchmarkConfig
    editor: nn.Module
    text_encoder: TextEncoder
    train: EditSet
    evals: dict[str, EditSet]  # split of ``tasks.EVAL_SPLITS`` -> its test-photo set
    raw_dims: dict[str, dict[str, int]]  # condition -> its encoder's stream widths
    photos: dict[str, list] = field(default_factory=dict)  # "train" / "test" -> photos

    @property
    def condition(self) -> str:
        """The main condition (the first of ``cfg.conditions``)."""
        return self.cfg.conditions[0]

    @property
    def edit_names(self) -> list[str]:
        """The family's edits (``tasks.EDIT_NAMES`` starts with them: ids 0 .. K - 1)."""
        return list(FAMILY)


@dataclass
class Method:
    """One row of the benchmark: how a fresh method is built, how fast it learns, what it reports.

    ``build(ctx, seed, trained)`` gets the methods this seed has trained so far (rows run in table
    order); ``track(ctx, method)`` (first seed only) returns a training callback whose ``result``
    the run reports; ``views(ctx, method)`` yields the names to evaluate the trained method under
    (default: its own name; it may change the method's state between names and must restore it).
    """

    name: str
    label: str
    build: Callable[[Context, int, dict], nn.Module]
    lr: Callable[[BenchmarkConfig], float]
    condition: str | None = None  # None: the main condition
    track: Callable[[Context, nn.Module], object] | None = None
    views: Callable[[Context, nn.Module], Iterator[str]] | None = None


def _memory(condition: str | None = None):
    def build(ctx: Context, seed: int, trained: dict) -> nn.Module:
        cond = condition or ctx.condition
        memory = make_memory(ctx.editor, ctx.train.raw[cond], ctx.raw_dims[cond], ctx.cfg, seed)
        if cond in ctx.cfg.warm_start:
            memory.warm_start = warm_start_from_bank(memory, trained["per_task_lora"], ctx.train, cond, ctx.cfg, seed)
        return memory
    return build


def _shared(ctx: Context, seed: int, trained: dict) -> nn.Module:
    return Shared(ctx.editor, ctx.cfg.targets, ctx.cfg.rank, ctx.cfg.alpha)


def _matched(ctx: Context, seed: int, trained: dict) -> nn.Module:
    """A shared LoRA with at least the generator's trainable parameters."""
    rank = matched_rank(trained["functional_memory"].num_trainable_parameters(), trained["shared_lora"].targets)
    return Shared(ctx.editor, ctx.cfg.targets, rank, ctx.cfg.alpha * rank / ctx.cfg.rank)


def _bank(ctx: Context, seed: int, trained: dict) -> nn.Module:
    """One LoRA per family edit, trained with sum routing (a composition trains both its edits' LoRAs)."""
    bank = Bank(ctx.editor, ctx.cfg.targets, ctx.cfg.rank, ctx.cfg.alpha, len(ctx.edit_names))
    bank.route = "sum"
    return bank


def _conflict_tracker(ctx: Context, shared: nn.Module):
    return analysis.ConflictTracker(shared, ctx.train, ctx.condition, len(ctx.edit_names), ctx.cfg)


def _bank_views(ctx: Context, bank: Bank) -> Iterator[str]:
    """The bank told the first edit (``per_task_lora``), picked by the nearest key to the condition
    (``retrieval_lora``; keys from single-edit training samples), and told both edits (``lora_sum``)."""
    singles = ctx.train.second_ids < 0
    bank.set_keys(ctx.train.pooled[ctx.condition][singles], ctx.train.edit_ids[singles])
    try:
        for name, route in (("per_task_lora", "label"), ("retrieval_lora", "retrieval"), ("lora_sum", "sum")):
            bank.route = route
            yield name
    finally:
        bank.route = "label"


def methods_table(cfg: BenchmarkConfig) -> list[Method]:
    """The benchmark's trained methods in training order (the matched LoRA reads the generator's size),
    less ``cfg.skip_methods``."""
    lr_generator, lr_lora = (lambda c: c.lr_generator), (lambda c: c.lr_lora)
    memories = [Method("functional_memory", "functional memory", _memory(), lr_generator),
                *[Method(f"functional_memory[{c}]", f"functional memory [{c}]", _memory(c), lr_generator, condition=c)
                  for c in cfg.conditions[1:]]]
    cold = [m for m in memories if (m.condition or cfg.conditions[0]) not in cfg.warm_start]
    warm = [m for m in memories if m not in cold]  # distilled from the trained bank: they train after it
    table = [*cold, Method("shared_lora", "shared LoRA", _shared, lr_lora, track=_conflict_tracker),
             Method("per_task_lora", "per-task LoRAs", _bank, lr_lora, views=_bank_views), *warm,
             Method("shared_lora_matched", "shared LoRA, matched rank", _matched, lr_lora)]
    return [m for m in table if m.name not in cfg.skip_methods]


def prepare(cfg: BenchmarkConfig, timer: Timer, progress: bool = True) -> Context:
    """Photos, task examples of every split, the cached base editor and every set's frozen features."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.data_seed)
    with timer.stage("data"):
        train_photos, test_photos = photo_split(cfg.images, cfg.data_seed)
        examples = task_examples(cfg, train_photos, test_photos)
    with timer.stage("base_editor"):
        text_encoder = TextEncoder()
        editor_cfg = EditorConfig.from_dict({**cfg.editor, "image_size": cfg.size})
        editor = load_or_train_editor(editor_cfg, cfg.cache_dir, steps=cfg.editor_steps, text_encoder=text_encoder,
                                      progress=progress).to(device)
    with timer.stage("features"):
        encoders = {c: make_encoder(c, editor, text_encoder) for c in cfg.conditions}
        base_text = NEUTRAL if cfg.base_instruction == "neutral" else None
        sets = {k: build_set(ex, text_encoder, encoders, editor_cfg, device, base_text) for k, ex in examples.items()}
    return Context(cfg, editor, text_encoder, sets.pop("train"), sets, {c: e.raw_dims for c, e in encoders.items()},
                   {"train": train_photos, "test": test_photos})


@dataclass
class Trained:
    """Every seed's evaluations (``evals[split][method]``: one per seed), and the first seed's methods."""

    evals: dict[str, dict[str, list[dict]]]
    train: dict[str, list[dict]] = field(default_factory=dict)  # on training examples, as many as a test split
    first: dict[str, nn.Module] = field(default_factory=dict)
    conflict: dict | None = None
    processes: int = 1  # processes that trained the seeds (this one and its forked children)


def train_seed(ctx: Context, seed: int, out: Trained, timer: Timer, track: bool = False) -> dict[str, nn.Module]:
    """Every row of the table for one seed, each evaluated on every split into ``out`` (and on
    training examples); ``track``: run the rows' training callbacks (the first seed's analyses).
    Returns the trained methods by name."""
    cfg = ctx.cfg
    fitted = ctx.train.head(cfg.test_examples)
    trained: dict[str, nn.Module] = {}
    for m in methods_table(cfg):
        cond = m.condition or ctx.condition
        with timer.stage(m.name):
            torch.manual_seed(seed)
            method = m.build(ctx, seed, trained).to(cfg.device)
            tracker = m.track(ctx, method) if m.track and track else None
            train(method, ctx.train, cond, cfg, m.lr(cfg), seed, f"{m.label} (seed {seed})", tracker)
            for view in m.views(ctx, method) if m.views else (m.name,):
                _record(out, ctx, fitted, view, method, cond)
        if tracker is not None:
            out.conflict = tracker.result(ctx.edit_names)
        trained[m.name] = method
    return trained


def _record(out: Trained, ctx: Context, fitted: EditSet, name: str, method, cond: str, times: int = 1) -> None:
    """A method's evaluation on every split it is reported on, and on training examples."""
    for split, data in ctx.evals.items():
        if split in ONLY_ON.get(name, (split,)):
            out.evals[split].setdefault(name, []).extend([evaluate(method, data, cond)] * times)
    if name not in ONLY_ON:
        out.train.setdefault(name, []).extend([evaluate(method, fitted, cond)] * times)


_FORKED: Context | None = None  # the context a forked seed process inherits (``_seed_in_child``)


def _seed_in_child(seed: int) -> tuple[dict, dict]:
    """One seed in a forked process, one thread: its evaluations (the methods stay in the child)."""
    torch.set_num_threads(1)
    out = Trained({split: {} for split in _FORKED.evals})
    train_seed(_FORKED, seed, out, Timer())
    return out.evals, out.train


def train_methods(ctx: Context, timer: Timer, workers: int = 1) -> Trained:
    """Every row of the table for every seed; identity and the frozen base are evaluated once.

    ``workers`` > 1 trains the seeds after the first in that many - 1 forked processes (one thread
    each) while this process trains the first: seeds are independent and every batch is a function
    of (seed, step), so the numbers are those of training them one after another (a test checks it).
    """
    global _FORKED
    cfg = ctx.cfg
    out = Trained({split: {} for split in ctx.evals})
    fitted = ctx.train.head(cfg.test_examples)
    _record(out, ctx, fitted, "identity", Identity(), ctx.condition, len(cfg.seeds))
    _record(out, ctx, fitted, "base", Base(ctx.editor), ctx.condition, len(cfg.seeds))
    first, rest = cfg.seeds[0], cfg.seeds[1:]
    pool, futures = None, []
    if workers > 1 and rest and cfg.device == "cpu":  # a forked process cannot use the parent's CUDA context
        _FORKED = ctx
        out.processes = 1 + min(workers - 1, len(rest))
        pool = ProcessPoolExecutor(out.processes - 1, mp_context=multiprocessing.get_context("fork"))
        futures = [pool.submit(_seed_in_child, seed) for seed in rest]
    try:
        out.first = train_seed(ctx, first, out, timer, track=True)
        if pool is None:
            for seed in rest:
                train_seed(ctx, seed, out, timer)
        for future in futures:  # in seed order, so every list stays ordered by seed
            with timer.stage("other_seeds_wait"):
                evals, fit = future.result()
            for split, methods in evals.items():
                for name, results in methods.items():
                    out.evals[split].setdefault(name, []).extend(results)
            for name, results in fit.items():
                out.train.setdefault(name, []).extend(results)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        _FORKED = None
    return out


def parameter_counts(editor, methods: dict[str, nn.Module]) -> dict:
    """Trainable parameters of the first seed's methods (and what the generator makes per instance)."""
    memory, shared, bank = (methods[k] for k in ("functional_memory", "shared_lora", "per_task_lora"))
    out = {"base_editor": editor.count_parameters(), "shared_lora": shared.num_trainable_parameters(),
           "min_full_rank": min(min(t.in_features, t.out_features) for t in shared.targets),
           "per_task_lora": bank.num_trainable_parameters(), "retrieval_lora": bank.num_trainable_parameters(),
           "functional_memory": memory.num_trainable_parameters(),
           "functional_memory_generator": memory.fm.num_trainable_parameters(),
           "generated_per_instance": memory.fm.lora_parameters_per_instance()}
    if "shared_lora_matched" in methods:
        matched = methods["shared_lora_matched"]
        out.update(shared_lora_matched=matched.num_trainable_parameters(), shared_lora_matched_rank=matched.rank)
    return out


def analyse(ctx: Context, first: dict[str, nn.Module]) -> tuple[dict, dict]:
    """The first seed's analyses: routing, retrieval accuracy, instruction probe, manifold, storage.
    Returns (results, manifold points for the figure)."""
    memory, bank, cond = first["functional_memory"], first["per_task_lora"], ctx.condition
    seen, held_out = ctx.evals["seen_wording"], ctx.evals["held_out_wording"]
    accuracy = lambda data: (bank.retrieve(data.pooled[cond]) == data.edit_ids).float().mean().item()
    out = {"routing": analysis.routing(memory, seen, cond), "retrieval_accuracy": accuracy(held_out),
           "retrieval_accuracy_seen_phrasings": accuracy(seen),
           "instruction_probe": dict(zip(("held_out_phrasings", "seen_phrasings"),
                                         analysis.instruction_probe(ctx.text_encoder, ctx.train, held_out, seen)))}
    out["manifold"], points = analysis.manifold(memory, seen, cond, ctx.edit_names)
    out["manifold"]["value_spearman"] = analysis.value_spearman(
        memory, [seen, ctx.evals["held_out_values"]], cond)
    out["storage"] = analysis.storage(memory, bank, first["shared_lora"])
    return out, points


def run(cfg: BenchmarkConfig, out: str | Path, progress: bool = True, workers: int = 1) -> dict:
    """The whole benchmark; returns the results dict (also written to ``out/results.json``).
    ``workers``: processes training seeds side by side (``train_methods``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    ctx = prepare(cfg, timer, progress)
    trained = train_methods(ctx, timer, workers)
    first, memory = trained.first, trained.first["functional_memory"]
    results = {"tasks": ctx.edit_names, "inverse_pairs": [list(p) for p in analysis.inverse_pairs(ctx.edit_names)],
               "config": asdict(cfg), "eval": {split: _by_method(e) for split, e in trained.evals.items()},
               "methods_train": _by_method(trained.train),
               "params": parameter_counts(ctx.editor, first), "gradient_conflict": trained.conflict,
               "splits": {"train_photos": [p.name for p in ctx.photos["train"]],
                          "test_photos": [p.name for p in ctx.photos["test"]],
                          "train_examples": len(ctx.train), "test_examples": {k: len(v) for k, v in ctx.evals.items()}},
               "condition": ctx.condition,
               "warm_start": {name: m.warm_start for name, m in first.items() if hasattr(m, "warm_start")}}
    with timer.stage("analyses"):
        analysed, manifold_points = analyse(ctx, first)
        results.update(analysed)
    with timer.stage("scaling"):
        results["scaling"] = scaling(ctx, results["eval"]["seen_wording"]["functional_memory"]["per_seed_psnr"][0])
    with timer.stage("save"):
        rundir.save_run(out, asdict(cfg), ctx.editor, {k: first[k] for k in ("functional_memory", "shared_lora",
                                                                            "shared_lora_matched", "per_task_lora")
                                                       if k in first})
        io.write_json(out / "manifest.json", {"train": manifest(ctx.photos["train"]), "test": manifest(ctx.photos["test"])})
    results["seed_processes"] = trained.processes
    results["timing"] = {**timer.seconds, "edit_latency_ms": analysis.edit_latency(memory, ctx.train, ctx.condition)}
    samples = analysis.sample_rows(ctx.evals, ctx.condition, {"base": Base(ctx.editor), **first})
    io.write_json(out / "results.json", results)
    torch.save({"samples": samples, "manifold": manifold_points}, out / "figures.pt")
    return results


def _by_method(evals: dict[str, list[dict]]) -> dict:
    """Each method's mean over seeds, in ``METHODS`` order."""
    order = [m for m in METHODS if m in evals] + [m for m in evals if m not in METHODS]
    return {m: mean_over_seeds(evals[m]) for m in order}


def scaling(ctx: Context, main_psnr: float) -> dict:
    """Generator depth and LoRA rank sweeps (first seed, seen wording); the main config's point is
    reused. Empty sweeps (the quick run) measure nothing."""
    cfg, cond, seed = ctx.cfg, ctx.condition, ctx.cfg.seeds[0]
    sweeps = {"depth": (cfg.scaling_depths, cfg.generator["depth"]), "rank": (cfg.scaling_ranks, cfg.rank)}
    out = {}
    for what, (values, main) in sweeps.items():
        out[what] = {}
        for value in values:
            if value == main:
                out[what][str(value)] = main_psnr
                continue
            memory = make_memory(ctx.editor, ctx.train.raw[cond], ctx.raw_dims[cond], cfg, seed, **{what: value})
            train(memory, ctx.train, cond, cfg, cfg.lr_generator, seed, f"scaling: {what} {value}")
            out[what][str(value)] = evaluate(memory, ctx.evals["seen_wording"], cond)["psnr"]
    return out
