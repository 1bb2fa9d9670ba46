"""PSNR / SSIM of a method on a set, the mean over seeds, and ``funcmem eval`` (a saved run's
methods on another folder of photos)."""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from ... import io
from ..data import load_folder, make_examples
from ..metrics import psnr, ssim
from ..ops import EDITS
from ..rundir import load_run
from .sets import EditSet, build_set


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


def evaluate_run(run: str | Path, images: str, out: str | Path | None = None, n: int = 384, seed: int = 0) -> dict:
    """``funcmem eval``: the run's methods on crops of another photo folder, all phrasings."""
    loaded = load_run(run)
    edit_names = list(EDITS)
    photos = load_folder(images)
    halves = [make_examples(photos, edit_names, n // 2, loaded.size, split, seed + i)
              for i, split in enumerate(("train", "test"))]
    examples = {k: (halves[0][k] + halves[1][k]) if isinstance(halves[0][k], list) else torch.cat([halves[0][k], halves[1][k]])
                for k in halves[0]}
    cond = loaded.condition
    data = build_set(examples, loaded.text_encoder, {cond: loaded.encoder}, loaded.editor.config, "cpu")
    table = {name: evaluate(m, data, cond, edit_names) for name, m in loaded.methods.items()}
    bank = loaded.methods.get("per_task_lora")
    if bank is not None:  # the same LoRAs picked by the nearest key instead of the label
        bank.route = "retrieval"
        table["retrieval_lora"] = evaluate(bank, data, cond, edit_names)
        bank.route = "label"
    result = {"run": str(run), "images": str(images), "examples": len(data), "methods": table}
    io.write_json(Path(out) if out else Path(run) / "eval.json", result)
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem eval``'s options."""
    parser.add_argument("--run", required=True, help="a run directory (`funcmem demo` output)")
    parser.add_argument("--images", required=True, help="a folder of JPEG/PNG photos")
    parser.add_argument("--out", default=None, help="default: RUN/eval.json")


def run_cli(args: argparse.Namespace) -> int:
    result = evaluate_run(args.run, args.images, args.out)
    for k, v in result["methods"].items():
        print(f"{k:28s} PSNR {v['psnr']:6.2f}  SSIM {v['ssim']:.3f}")
    return 0
