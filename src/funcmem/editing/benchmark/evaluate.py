"""PSNR / SSIM of a method on a set, the mean over seeds, and ``funcmem eval`` (a saved run's
methods on another folder of photos).

The results contract (``results.json``'s ``eval``, and what ``funcmem eval`` writes)::

    eval[split][method] = {"psnr", "psnr_std", "ssim", "ssim_std", "per_seed_psnr", "per_edit"}
    per_edit[edit or "first + second"] = {"psnr", "psnr_std", "ssim"}

for split in ``tasks.EVAL_SPLITS`` and the methods of ``run.METHODS`` (``lora_sum`` on compositions).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ... import io
from ..data import load_folder
from ..metrics import psnr, ssim
from ..methods import Identity
from ..rundir import load_run
from ..tasks import EVAL_SPLITS, make_task_examples
from .sets import EditSet, build_set


@torch.no_grad()
def evaluate(method, data: EditSet, condition: str, **predict_kwargs) -> dict:
    """PSNR / SSIM on a set: means, and per edit (``data.groups``: an edit or a pair)."""
    method.eval()
    p, s = [], []
    for batch in data.chunks(condition):
        out = method.predict(batch, **predict_kwargs)
        p.append(psnr(out, batch["targets"]))
        s.append(ssim(out, batch["targets"]))
    p, s = torch.cat(p).cpu(), torch.cat(s).cpu()
    per_edit = {}
    for name in sorted(set(data.groups)):
        sel = torch.tensor([g == name for g in data.groups])
        per_edit[name] = {"psnr": p[sel].mean().item(), "ssim": s[sel].mean().item()}
    return {"psnr": p.mean().item(), "ssim": s.mean().item(), "per_edit": per_edit}


def mean_over_seeds(runs: list[dict]) -> dict:
    """Seeds' evaluations -> mean with ``psnr_std`` / ``ssim_std`` beside it."""
    std = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    out = {"psnr": statistics.mean(r["psnr"] for r in runs), "psnr_std": std([r["psnr"] for r in runs]),
           "ssim": statistics.mean(r["ssim"] for r in runs), "ssim_std": std([r["ssim"] for r in runs]),
           "per_seed_psnr": [r["psnr"] for r in runs], "per_edit": {}}
    for task in runs[0]["per_edit"]:
        vals = [r["per_edit"][task] for r in runs]
        out["per_edit"][task] = {"psnr": statistics.mean(v["psnr"] for v in vals),
                                 "psnr_std": std([v["psnr"] for v in vals]),
                                 "ssim": statistics.mean(v["ssim"] for v in vals)}
    return out


def evaluate_run(run: str | Path, images: str, out: str | Path | None = None, n: int = 96, seed: int = 0) -> dict:
    """``funcmem eval``: the run's methods on crops of another photo folder, ``n`` examples of each
    split of ``tasks.EVAL_SPLITS``; writes ``{"run", "images", "examples", "eval"}`` (the contract above)."""
    loaded = load_run(run)
    photos = load_folder(images)
    cond, bank = loaded.condition, loaded.methods.get("per_task_lora")
    table = {}
    for i, split in enumerate(EVAL_SPLITS):
        examples = make_task_examples(photos, split, n, loaded.size, seed + i)
        data = build_set(examples, loaded.text_encoder, {cond: loaded.encoder}, loaded.editor.config, "cpu",
                         loaded.base_text)
        table[split] = {"identity": evaluate(Identity(), data, cond)}
        table[split].update({name: evaluate(m, data, cond) for name, m in loaded.methods.items()})
        if bank is not None:  # the same LoRAs picked by the nearest key, or added for two edits
            for name, route in (("retrieval_lora", "retrieval"), ("lora_sum", "sum")):
                if route != "sum" or split == "held_out_compositions":
                    bank.route = route
                    table[split][name] = evaluate(bank, data, cond)
            bank.route = "label"
    table = {split: {m: mean_over_seeds([e]) for m, e in t.items()} for split, t in table.items()}  # one run: std 0
    result = {"run": str(run), "images": str(images), "examples": n, "eval": table}
    io.write_json(Path(out) if out else Path(run) / "eval.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem eval``'s options."""
    parser.add_argument("--run", required=True, help="a run directory (`funcmem demo` output)")
    parser.add_argument("--images", required=True, help="a folder of JPEG/PNG photos")
    parser.add_argument("--out", default=None, help="default: RUN/eval.json")


def run_cli(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, args.images, args.out)
    for split, methods in result["eval"].items():
        print(split)
        for k, v in methods.items():
            print(f"  {k:28s} PSNR {v['psnr']:6.2f}  SSIM {v['ssim']:.3f}")
    return 0
