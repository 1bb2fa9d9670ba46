"""The editing benchmark: every method trained on the same data, steps, batch and seeds, then
evaluated and analysed. ``run(config, out)`` writes ``results.json`` and the run's checkpoints;
``report.write_report`` adds the pictures and ``report.md``.

Data flow:

    photos (wheels or --images) -> split by photo -> crops + edits (train / held-out phrasings)
    -> frozen features once: MiniLM token states (the editor reads them) + raw condition streams
    -> methods trained by funcmem.train.Trainer -> PSNR / SSIM per edit on the test split
"""

from __future__ import annotations

import json
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .. import io
from ..generator import GeneratorConfig
from ..train import Trainer, TrainConfig
from . import analysis
from .conditions import BaseHiddenEncoder, MiniLMEfficientNet, TextEncoder
from .data import load_folder, load_photos, make_examples, manifest, split_photos
from .editor import Editor, EditorConfig
from .methods import Base, Bank, EditingMemory, Shared, mse_loss, pooled_condition
from .metrics import psnr, ssim
from .ops import EDITS
from .pretrain import PHOTOS as PRETRAIN_PHOTOS
from .pretrain import load_or_train_editor

METHODS = ("base", "shared_lora", "shared_lora_matched", "per_task_lora", "retrieval_lora", "functional_memory")


@dataclass
class BenchmarkConfig:
    """Everything a run depends on (saved as ``config.json`` in the run directory)."""

    size: int = 32
    train_examples: int = 3072
    test_examples: int = 576
    steps: int = 1200  # the full run: 3 seeds x 2 conditions in under an hour on 2 cores
    batch: int = 16
    rank: int = 4
    alpha: float = 4.0
    lr_lora: float = 3e-3
    lr_generator: float = 1e-3  # below the LoRA's: a faster generator collapsed in a feasibility study
    condition_dim: int = 64
    generator: dict = field(default_factory=lambda: GeneratorConfig(d_model=96, depth=2, head_dim=16, token_dim=64,
                                                                     dim_accumulation=4).to_dict())
    targets: list = field(default_factory=lambda: ["img_attn.qkv", "img_attn.proj", "img_mlp.fc1", "img_mlp.fc2"])
    conditions: list = field(default_factory=lambda: ["encoders", "base-hidden"])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    scaling_depths: list = field(default_factory=lambda: [1, 2, 4])
    scaling_ranks: list = field(default_factory=lambda: [2, 4, 8])
    conflict_samples: int = 48
    editor: dict = field(default_factory=lambda: EditorConfig().to_dict())
    editor_steps: int = 1500
    images: str | None = None
    device: str = "cpu"
    cache_dir: str | None = None
    data_seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> "BenchmarkConfig":
        """Under 10 minutes on 2 CPU cores, every analysis still shown."""
        base = dict(train_examples=2048, test_examples=384, steps=500, conditions=["encoders"], seeds=[0],
                    scaling_depths=[1, 2], scaling_ranks=[2, 4], conflict_samples=32, editor_steps=1200)
        return cls(**{**base, **overrides})

    def generator_config(self, **changes) -> GeneratorConfig:
        return GeneratorConfig.from_dict({**self.generator, **changes})


# ------------------------------------------------------------------ data


class EditSet:
    """Examples with their frozen features, on one device; ``batch(idx)`` -> a method's batch dict."""

    def __init__(self, examples: dict, text_states: Tensor, text_mask: Tensor, raw: dict[str, dict[str, Tensor]]):
        self.inputs, self.targets = examples["inputs"], examples["targets"]
        self.instructions, self.edit_ids = examples["instructions"], examples["edit_ids"]
        self.text_states, self.text_mask = text_states, text_mask
        self.raw = raw  # condition name -> streams
        self.pooled = {name: pooled_condition(streams) for name, streams in raw.items()}

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: Tensor, condition: str) -> dict:
        return {"inputs": self.inputs[idx], "targets": self.targets[idx], "text_states": self.text_states[idx],
                "text_mask": self.text_mask[idx], "edit_ids": self.edit_ids[idx],
                "raw": {k: v[idx] for k, v in self.raw[condition].items()}, "pooled": self.pooled[condition][idx]}

    def chunks(self, condition: str, size: int = 128):
        for start in range(0, len(self), size):
            yield self.batch(torch.arange(start, min(start + size, len(self))), condition)


def encode_raw(encoder, images: Tensor, instructions: list[str], chunk: int = 128) -> dict[str, Tensor]:
    """Raw condition streams for a whole set, computed in chunks."""
    parts = [encoder.raw(images[i:i + chunk], instructions[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build_set(examples: dict, text_encoder: TextEncoder, encoders: dict, editor_cfg: EditorConfig, device) -> EditSet:
    states, mask = text_encoder.encode(examples["instructions"], editor_cfg.max_text_tokens)
    raw = {name: encode_raw(enc, examples["inputs"], examples["instructions"]) for name, enc in encoders.items()}
    to = lambda t: t.to(device)
    examples = {**examples, "inputs": to(examples["inputs"]), "targets": to(examples["targets"]),
                "edit_ids": to(examples["edit_ids"])}
    return EditSet(examples, to(states), to(mask), {n: {k: to(v) for k, v in r.items()} for n, r in raw.items()})


def photo_split(images: str | None, seed: int):
    """Train and test photos; with the bundled photos, the base editor's pretraining photos stay in train."""
    if images:
        return split_photos(load_folder(images), seed=seed)
    photos = load_photos()
    held = [p for p in photos if p.name in PRETRAIN_PHOTOS]
    rest = [p for p in photos if p.name not in PRETRAIN_PHOTOS]
    train, test = split_photos(rest, test_fraction=0.25 * len(photos) / max(1, len(rest)), seed=seed)
    return held + train, test


# ------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(method, data: EditSet, condition: str, edit_names: list[str], **predict_kwargs) -> dict:
    """PSNR / SSIM on a set: means and per edit."""
    method.eval()
    p, s = [], []
    for batch in data.chunks(condition):
        out = method.predict(batch, **predict_kwargs)
        p.append(psnr(out, batch["targets"]))
        s.append(ssim(out, batch["targets"]))
    p, s = torch.cat(p).cpu(), torch.cat(s).cpu()
    ids = data.edit_ids.cpu()
    per_task = {name: {"psnr": p[ids == k].mean().item(), "ssim": s[ids == k].mean().item()}
                for k, name in enumerate(edit_names) if (ids == k).any()}
    return {"psnr": p.mean().item(), "ssim": s.mean().item(), "per_task": per_task}


def mean_over_seeds(runs: list[dict]) -> dict:
    """Seeds' evaluations -> mean with ``psnr_std`` / ``ssim_std`` beside it."""
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    out = {"psnr": statistics.mean(r["psnr"] for r in runs), "psnr_std": std([r["psnr"] for r in runs]),
           "ssim": statistics.mean(r["ssim"] for r in runs), "ssim_std": std([r["ssim"] for r in runs]),
           "per_seed_psnr": [r["psnr"] for r in runs], "per_task": {}}
    for task in runs[0]["per_task"]:
        vals = [r["per_task"][task] for r in runs]
        out["per_task"][task] = {"psnr": statistics.mean(v["psnr"] for v in vals),
                                 "psnr_std": std([v["psnr"] for v in vals]),
                                 "ssim": statistics.mean(v["ssim"] for v in vals)}
    return out


# ------------------------------------------------------------------ training


class Timer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 2)


def train(method, data: EditSet, condition: str, cfg: BenchmarkConfig, lr: float, seed: int, name: str,
          callback=None, loss_fn=mse_loss):
    """Train one method with the shared settings; batches are a function of (seed, step)."""
    def batch_fn(step: int) -> dict:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return data.batch(torch.randint(len(data), (cfg.batch,), generator=g).to(data.inputs.device), condition)

    warmup = max(1, cfg.steps // 20)
    trainer = Trainer(method, loss_fn, TrainConfig(steps=cfg.steps, lr=lr, warmup_steps=warmup, grad_clip=1.0,
                                                    description=name, log_every=max(1, cfg.steps // 20)))
    method.train()
    trainer.fit(batch_fn, callback=callback)
    method.eval()
    return trainer.history


def matched_rank(memory_params: int, targets) -> int:
    """Smallest rank whose shared LoRA has at least ``memory_params`` trainable parameters."""
    per_rank = sum(t.in_features + t.out_features for t in targets)
    return max(1, math.ceil(memory_params / per_rank))


def make_memory(editor, train_raw: dict[str, Tensor], raw_dims, cfg: BenchmarkConfig, seed: int,
                **gen_changes) -> EditingMemory:
    """A fresh generator whose projector standardises with the training features' statistics."""
    torch.manual_seed(seed)
    rank = gen_changes.pop("rank", cfg.rank)
    gen_changes.setdefault("dim_accumulation", math.gcd(rank, cfg.generator["dim_accumulation"]))  # must divide r
    memory = EditingMemory(editor, raw_dims, cfg.targets, rank, cfg.alpha * rank / cfg.rank, cfg.condition_dim,
                           cfg.generator_config(**gen_changes)).to(cfg.device)
    memory.projector.set_statistics(train_raw)
    return memory


def run(cfg: BenchmarkConfig, out: str | Path, progress: bool = True) -> dict:
    """The whole benchmark; returns the results dict (also written to ``out/results.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timer, device = Timer(), torch.device(cfg.device)
    edit_names = list(EDITS)
    torch.manual_seed(cfg.data_seed)

    with timer.stage("data"):
        train_photos, test_photos = photo_split(cfg.images, cfg.data_seed)
        train_ex = make_examples(train_photos, edit_names, cfg.train_examples, cfg.size, "train", cfg.data_seed)
        test_ex = make_examples(test_photos, edit_names, cfg.test_examples, cfg.size, "test", cfg.data_seed + 1)
        # the same test photos with training phrasings: separates "unseen photo" from "unseen wording"
        seen_ex = make_examples(test_photos, edit_names, cfg.test_examples, cfg.size, "train", cfg.data_seed + 2)
    with timer.stage("base_editor"):
        text_encoder = TextEncoder()
        editor_cfg = EditorConfig.from_dict({**cfg.editor, "image_size": cfg.size})
        editor = load_or_train_editor(editor_cfg, cfg.cache_dir, steps=cfg.editor_steps, text_encoder=text_encoder,
                                      progress=progress).to(device)
    with timer.stage("features"):
        encoders = {}
        if "encoders" in cfg.conditions:
            encoders["encoders"] = MiniLMEfficientNet(text_encoder)
        if "base-hidden" in cfg.conditions:
            encoders["base-hidden"] = BaseHiddenEncoder(editor, text_encoder)
        train_set = build_set(train_ex, text_encoder, encoders, editor_cfg, device)
        test_set = build_set(test_ex, text_encoder, encoders, editor_cfg, device)
        seen_set = build_set(seen_ex, text_encoder, encoders, editor_cfg, device)
    main_cond = cfg.conditions[0]
    raw_dims = {name: enc.raw_dims for name, enc in encoders.items()}

    evals: dict[str, list[dict]] = {m: [] for m in METHODS}
    evals.update({f"functional_memory[{c}]": [] for c in cfg.conditions[1:]})
    seen = {m: [] for m in evals}  # the same methods on seen phrasings

    def record(name: str, method, cond: str = main_cond) -> None:
        evals[name].append(evaluate(method, test_set, cond, edit_names))
        seen[name].append(evaluate(method, seen_set, cond, edit_names))

    kept, conflict, params = {}, None, {}
    base_eval = (evaluate(Base(editor), test_set, main_cond, edit_names),  # frozen: the same for every seed
                 evaluate(Base(editor), seen_set, main_cond, edit_names))
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        first = seed == cfg.seeds[0]
        with timer.stage("functional_memory"):
            memory = make_memory(editor, train_set.raw[main_cond], raw_dims[main_cond], cfg, seed)
            train(memory, train_set, main_cond, cfg, cfg.lr_generator, seed, f"functional memory (seed {seed})")
            record("functional_memory", memory)
        for cond in cfg.conditions[1:]:
            with timer.stage(f"functional_memory[{cond}]"):
                other = make_memory(editor, train_set.raw[cond], raw_dims[cond], cfg, seed)
                train(other, train_set, cond, cfg, cfg.lr_generator, seed, f"functional memory [{cond}] (seed {seed})")
                record(f"functional_memory[{cond}]", other, cond)
        with timer.stage("shared_lora"):
            torch.manual_seed(seed)
            shared = Shared(editor, cfg.targets, cfg.rank, cfg.alpha).to(device)
            tracker = analysis.ConflictTracker(shared, train_set, main_cond, len(edit_names), cfg) if first else None
            train(shared, train_set, main_cond, cfg, cfg.lr_lora, seed, f"shared LoRA (seed {seed})", tracker)
            record("shared_lora", shared)
            if tracker:
                conflict = tracker.result(edit_names)
        with timer.stage("shared_lora_matched"):
            rank = matched_rank(memory.num_trainable_parameters(), shared.targets)
            torch.manual_seed(seed)
            matched = Shared(editor, cfg.targets, rank, cfg.alpha * rank / cfg.rank).to(device)
            train(matched, train_set, main_cond, cfg, cfg.lr_lora, seed, f"shared LoRA rank {rank} (seed {seed})")
            record("shared_lora_matched", matched)
        with timer.stage("per_task_lora"):
            torch.manual_seed(seed)
            bank = Bank(editor, cfg.targets, cfg.rank, cfg.alpha, len(edit_names)).to(device)
            train(bank, train_set, main_cond, cfg, cfg.lr_lora, seed, f"per-task LoRAs (seed {seed})")
            record("per_task_lora", bank)
            bank.set_keys(train_set.pooled[main_cond], train_set.edit_ids)
            bank.route = "retrieval"
            record("retrieval_lora", bank)
            bank.route = "label"
        evals["base"].append(base_eval[0])
        seen["base"].append(base_eval[1])
        if first:
            kept = {"memory": memory, "shared": shared, "matched": matched, "bank": bank}
            params = {"base_editor": editor.count_parameters(),
                      "shared_lora": shared.num_trainable_parameters(),
                      "shared_lora_matched": matched.num_trainable_parameters(),
                      "shared_lora_matched_rank": rank,
                      "min_full_rank": min(min(t.in_features, t.out_features) for t in shared.targets),
                      "per_task_lora": bank.num_trainable_parameters(),
                      "retrieval_lora": bank.num_trainable_parameters(),
                      "functional_memory": memory.num_trainable_parameters(),
                      "functional_memory_generator": memory.fm.num_trainable_parameters(),
                      "generated_per_instance": memory.fm.lora_parameters_per_instance()}

    memory, bank = kept["memory"], kept["bank"]
    results = {"tasks": edit_names, "inverse_pairs": [list(p) for p in analysis.inverse_pairs(edit_names)],
               "config": asdict(cfg), "methods": {m: mean_over_seeds(v) for m, v in evals.items() if v},
               "methods_seen_phrasings": {m: mean_over_seeds(v) for m, v in seen.items() if v},
               "params": params, "gradient_conflict": conflict,
               "splits": {"train_photos": [p.name for p in train_photos], "test_photos": [p.name for p in test_photos],
                          "train_examples": len(train_set), "test_examples": len(test_set)},
               "condition": main_cond}
    with timer.stage("analyses"):
        results["routing"] = analysis.routing(memory, test_set, main_cond)
        results["retrieval_accuracy"] = (bank.retrieve(test_set.pooled[main_cond]) == test_set.edit_ids).float().mean().item()
        results["retrieval_accuracy_seen_phrasings"] = (
            bank.retrieve(seen_set.pooled[main_cond]) == seen_set.edit_ids).float().mean().item()
        results["instruction_probe"] = dict(zip(("held_out_phrasings", "seen_phrasings"),
                                                analysis.instruction_probe(text_encoder, train_set, test_set, seen_set)))
        results["manifold"], manifold_points = analysis.manifold(memory, test_set, main_cond, edit_names)
        results["storage"] = analysis.storage(memory, bank, kept["shared"])
    with timer.stage("scaling"):
        results["scaling"] = scaling(editor, raw_dims[main_cond], train_set, test_set, main_cond, cfg,
                                     results["methods"]["functional_memory"]["per_seed_psnr"][0], edit_names)
    with timer.stage("save"):
        save_run(out, cfg, editor, kept, train_set)
        io.write_json(out / "manifest.json", {"train": manifest(train_photos), "test": manifest(test_photos)})
    results["timing"] = {**timer.seconds, "edit_latency_ms": analysis.edit_latency(memory, test_set, main_cond)}
    results["samples"] = analysis.sample_rows(test_set, main_cond, edit_names, Base(editor), kept["shared"], memory)
    io.write_json(out / "results.json", {k: v for k, v in results.items() if k != "samples"})
    torch.save({"samples": results.pop("samples"), "manifold": manifold_points}, out / "figures.pt")
    return results


def scaling(editor, raw_dims, train_set, test_set, cond, cfg: BenchmarkConfig, main_psnr: float, edit_names) -> dict:
    """Generator depth and LoRA rank sweeps (first seed); the main config's point is reused."""
    seed = cfg.seeds[0]
    out = {"depth": {}, "rank": {}}
    main_depth = cfg.generator["depth"]
    for depth in cfg.scaling_depths:
        if depth == main_depth:
            out["depth"][str(depth)] = main_psnr
            continue
        memory = make_memory(editor, train_set.raw[cond], raw_dims, cfg, seed, depth=depth)
        train(memory, train_set, cond, cfg, cfg.lr_generator, seed, f"scaling: depth {depth}")
        out["depth"][str(depth)] = evaluate(memory, test_set, cond, edit_names)["psnr"]
    for rank in cfg.scaling_ranks:
        if rank == cfg.rank:
            out["rank"][str(rank)] = main_psnr
            continue
        memory = make_memory(editor, train_set.raw[cond], raw_dims, cfg, seed, rank=rank)
        train(memory, train_set, cond, cfg, cfg.lr_generator, seed, f"scaling: rank {rank}")
        out["rank"][str(rank)] = evaluate(memory, test_set, cond, edit_names)["psnr"]
    return out


# ------------------------------------------------------------------ run directory


def save_run(out: Path, cfg: BenchmarkConfig, editor: Editor, kept: dict, train_set: EditSet) -> None:
    """Checkpoints of the first seed's methods, so ``funcmem eval`` / ``funcmem edit`` can reload them."""
    io.write_json(out / "config.json", asdict(cfg))
    io.write_safetensors(out / "editor.safetensors", editor.state_dict())
    io.write_json(out / "editor.json", editor.config.to_dict())
    memory = kept["memory"]
    memory.fm.save_pretrained(out / "functional_memory")
    io.write_safetensors(out / "functional_memory" / "projector.safetensors", memory.projector.state_dict())
    kept["shared"].save_pretrained(out / "shared_lora")
    kept["matched"].save_pretrained(out / "shared_lora_matched")
    bank = kept["bank"]
    bank.save_pretrained(out / "per_task_lora")
    io.write_safetensors(out / "per_task_lora" / "keys.safetensors", {"keys": bank.keys})


def load_run(run: str | Path, device: str = "cpu") -> dict:
    """Rebuild a run's editor and methods: {"config", "editor", "methods": {name: method}}."""
    run = Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a benchmark run directory (no config.json); run `funcmem demo` first")
    cfg = io.config_from_dict(BenchmarkConfig, json.loads((run / "config.json").read_text()))
    editor = Editor(EditorConfig.from_dict(json.loads((run / "editor.json").read_text())))
    editor.load_state_dict(io.read_safetensors(run / "editor.safetensors"))
    editor.requires_grad_(False).eval()
    cond = cfg.conditions[0]
    text_encoder = TextEncoder()
    encoder = MiniLMEfficientNet(text_encoder) if cond == "encoders" else BaseHiddenEncoder(editor, text_encoder)
    gen_cfg = json.loads((run / "functional_memory" / "config.json").read_text())
    projector_state = io.read_safetensors(run / "functional_memory" / "projector.safetensors")
    trained_streams = {k.split(".")[1] for k in projector_state if k.startswith("streams.")}
    unknown = trained_streams - set(encoder.raw_dims)
    if unknown:
        raise ValueError(f"{run}: the generator was trained on condition streams {sorted(unknown)} that the "
                         f"{cond!r} encoder does not produce (it has {sorted(encoder.raw_dims)})")
    raw_dims = {k: d for k, d in encoder.raw_dims.items() if k in trained_streams}  # runs of older versions lack some
    memory = EditingMemory(editor, raw_dims, cfg.targets, gen_cfg["rank"], gen_cfg["alpha"],
                           gen_cfg["condition_dim"], GeneratorConfig.from_dict(gen_cfg["generator"]))
    memory.fm.generator.load_state_dict(io.read_safetensors(run / "functional_memory" / "model.safetensors"))
    memory.projector.load_state_dict(projector_state)
    shared = Shared.from_pretrained(run / "shared_lora", editor)
    matched = Shared.from_pretrained(run / "shared_lora_matched", editor)
    if not (run / "per_task_lora" / "config.json").is_file():
        raise FileNotFoundError(f"{run} has no per_task_lora/config.json: it was written by an older funcmem; "
                                "run `funcmem demo` again")
    bank = Bank.from_pretrained(run / "per_task_lora", editor)
    bank.keys = io.read_safetensors(run / "per_task_lora" / "keys.safetensors")["keys"]
    methods = {"base": Base(editor), "shared_lora": shared, "shared_lora_matched": matched, "per_task_lora": bank,
               "functional_memory": memory}
    methods = {k: m.to(device).eval() for k, m in methods.items()}
    return {"config": cfg, "editor": editor, "methods": methods, "encoder": encoder, "text_encoder": text_encoder,
            "condition": cond}


def evaluate_run(run: str | Path, images: str, out: str | Path | None = None, n: int = 384, seed: int = 0) -> dict:
    """``funcmem eval``: the run's methods on crops of another photo folder, all phrasings."""
    loaded = load_run(run)
    cfg, editor = loaded["config"], loaded["editor"]
    photos = load_folder(images)
    edit_names = list(EDITS)
    halves = [make_examples(photos, edit_names, n // 2, cfg.size, split, seed + i) for i, split in enumerate(("train", "test"))]
    examples = {k: (halves[0][k] + halves[1][k]) if isinstance(halves[0][k], list) else torch.cat([halves[0][k], halves[1][k]])
                for k in halves[0]}
    data = build_set(examples, loaded["text_encoder"], {loaded["condition"]: loaded["encoder"]}, editor.config, "cpu")
    methods = dict(loaded["methods"])
    table = {name: evaluate(m, data, loaded["condition"], edit_names) for name, m in methods.items()}
    bank = methods["per_task_lora"]
    bank.route = "retrieval"
    table["retrieval_lora"] = evaluate(bank, data, loaded["condition"], edit_names)
    bank.route = "label"
    result = {"run": str(run), "images": str(images), "examples": len(data), "methods": table}
    io.write_json(Path(out) if out else Path(run) / "eval.json", result)
    return result
