"""``funcmem bench lora``: what generated, per-sample LoRA costs, as ratios measured in one process.

Every figure is a ratio of two timings taken in the same run on the same device, after warm-up,
each the median of interleaved repeats (``timing.measure``). Writes ``lora.json`` and prints a table.

- ``dynamic_overhead``: (base + per-sample LoRA) / base forward of one ``nn.Linear`` (d -> d),
  batch 16, every sample its own LoRA, next to ``flop_share`` = r (d_in + d_out) / (d_in d_out),
  the arithmetic floor of that overhead.
- ``vs_naive_loop`` / ``vs_merge_per_sample``: speedup of the batched path over a Python loop over
  samples (LoRA applied per sample / merged into a weight copy per sample);
  ``batched_vs_sequential_decode``: one forward of 16 one-token samples with 16 LoRAs vs the 16
  run one at a time, each with its own LoRA, for several widths; ``vs_peft``: one LoRA for the batch, ours / PEFT's
  ``lora.Linear`` (<= 1: no slower).
- ``mix``: a batch of 32 with 1, 6 and 32 distinct LoRAs: overhead of the dispatcher's choice, the
  per-sample path and the one-per-segment path.
- ``generator_scaling``: one generation for N base layers at fixed S tokens per layer,
  factorized vs full attention: time, peak memory (resident-set high-water mark of a fresh
  process, Linux), analytic attention FLOPs, and their log-log slopes in N.
- ``generator_cost``: one generation vs one forward of an editor-sized base (width 96, depth 4;
  ``generator_speed.EditorSizedBase``) at 64 and 256 image tokens, and generate-once-reuse-20 (a
  diffusion sampler's pattern).
- ``train_step_ratio``: one functional-memory training step / one shared-LoRA step, demo sizes.

``--quick`` measures a subset; ``--smoke`` tiny shapes only (a test that the command works, no
meaningful numbers).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import mount
from ..io import write_json
from ..lora import LoRA
from ..bank import SharedLoRA
from .generator_speed import generator_cost, generator_scaling, train_step_ratio
from .timing import measure

SIZES = {  # what each mode measures
    "full": dict(dims=[512, 1024, 2048], ranks=[8, 16, 64], tokens=[1, 64, 1024], batch=16, compare_dim=1024,
                 compare_tokens=[1, 64, 1024], decode_dims=[1024, 2048, 4096], layers=[4, 8, 16, 32, 64],
                 repeats=7, min_time=0.05),
    "quick": dict(dims=[512, 1024], ranks=[8, 64], tokens=[1, 64], batch=16, compare_dim=1024,
                  compare_tokens=[1, 64], decode_dims=[1024, 4096], layers=[4, 8, 16, 32], repeats=5, min_time=0.02),
    "smoke": dict(dims=[64], ranks=[4], tokens=[1, 8], batch=4, compare_dim=64, compare_tokens=[1, 8],
                  decode_dims=[64], layers=[2, 4], repeats=2, min_time=0.001),
}



# ---------------------------------------------------------------- one Linear with LoRA


class _Layer:
    """An ``nn.Linear`` (d -> d) wrapped for LoRA, with factors for ``rows`` LoRAs."""

    def __init__(self, d: int, rank: int, rows: int, device, dtype, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(d, d)).to(device, dtype)
        self.shared = SharedLoRA(self.model, ["0"], rank=rank, alpha=2 * rank)
        self.wrapper = self.model[0]
        self.linear = self.wrapper.base_layer
        a = 0.02 * torch.randn(rows, rank, d, generator=g)
        b = 0.02 * torch.randn(rows, d, rank, generator=g)
        self.a, self.b = a.to(device, dtype), b.to(device, dtype)
        self.scale = self.shared.scale

    def lora(self, index=None, rows=None) -> LoRA:
        a, b = (self.a, self.b) if rows is None else (self.a[rows], self.b[rows])
        return LoRA({"0": (a, b)}, self.scale, index)


def _inputs(batch: int, tokens: int, d: int, device, dtype) -> torch.Tensor:
    return torch.randn(batch, tokens, d, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def dynamic_overhead(s: dict, device, dtype) -> list[dict]:
    rows = []
    for d in s["dims"]:
        for r in s["ranks"]:
            layer = _Layer(d, r, s["batch"], device, dtype)
            for t in s["tokens"]:
                x = _inputs(s["batch"], t, d, device, dtype)
                with torch.no_grad(), layer.shared.mounted(layer.lora()):
                    tm = measure({"base": lambda: layer.linear(x), "lora": lambda: layer.wrapper(x)},
                                  device, s["repeats"], s["min_time"])
                share = r * 2 * d / (d * d)
                ratio = tm["lora"] / tm["base"]
                rows.append({"d": d, "rank": r, "tokens": t, "batch": s["batch"], "base_ms": 1e3 * tm["base"],
                             "ratio": ratio, "overhead": ratio - 1, "flop_share": share,
                             "factor_bytes_share": s["batch"] * share,  # every sample's factors / the weight
                             "overhead_over_flop_share": (ratio - 1) / share, "path": layer.wrapper.last_path})
    return rows


def comparisons(s: dict, device, dtype) -> dict:
    """Batched per-sample LoRA vs a loop over samples and vs merging per sample; one shared LoRA
    vs PEFT's."""
    d, r, n = s["compare_dim"], 16 if s["compare_dim"] >= 256 else 4, s["batch"]
    layer = _Layer(d, r, n, device, dtype)
    lin, wrapper, a, b, scale = layer.linear, layer.wrapper, layer.a, layer.b, layer.scale
    naive, merged, peft_rows = [], [], []
    for t in s["compare_tokens"]:
        x = _inputs(n, t, d, device, dtype)

        def loop():
            return torch.cat([lin(x[i:i + 1]) + scale * (x[i:i + 1] @ a[i].T) @ b[i].T for i in range(n)])

        def merge_each():
            return torch.cat([F.linear(x[i:i + 1], lin.weight + scale * b[i] @ a[i], lin.bias) for i in range(n)])

        with torch.no_grad():
            with layer.shared.mounted(layer.lora()):
                ours = wrapper(x)
                torch.testing.assert_close(loop(), ours, rtol=1e-3, atol=1e-3)
                tm = measure({"ours": lambda: wrapper(x), "loop": loop, "merge": merge_each},
                              device, s["repeats"], s["min_time"])
            naive.append({"d": d, "rank": r, "tokens": t, "batch": n, "speedup": tm["loop"] / tm["ours"]})
            merged.append({"d": d, "rank": r, "tokens": t, "batch": n, "speedup": tm["merge"] / tm["ours"]})
            peft_rows.append(_vs_peft(layer, x, s, device))
    return {"vs_naive_loop": naive, "vs_merge_per_sample": merged, "vs_peft": peft_rows}


def sequential_decode(s: dict, device, dtype) -> list[dict]:
    """One token per sample, batch 16, 16 LoRAs: one batched forward vs the samples one at a
    time, each with its own LoRA mounted (what serving without batching does)."""
    out, n = [], s["batch"]
    for d in s["decode_dims"]:
        r = 16 if d >= 256 else 4
        layer = _Layer(d, r, n, device, dtype)
        x = _inputs(n, 1, d, device, dtype)
        singles = [layer.lora(rows=slice(i, i + 1)) for i in range(n)]

        def sequential():
            outs = []
            for i in range(n):
                with layer.shared.mounted(singles[i]):
                    outs.append(layer.wrapper(x[i:i + 1]))
            return torch.cat(outs)

        def batched():
            with layer.shared.mounted(layer.lora()):
                return layer.wrapper(x)

        with torch.no_grad():
            torch.testing.assert_close(sequential(), batched(), rtol=1e-3, atol=1e-3)
            tm = measure({"batched": batched, "sequential": sequential, "base": lambda: layer.linear(x),
                           "base_sequential": lambda: torch.cat([layer.linear(x[i:i + 1]) for i in range(n)])},
                          device, s["repeats"], s["min_time"])
        out.append({"d": d, "rank": r, "tokens": 1, "batch": n, "weight_mb": d * d * x.element_size() / 2**20,
                    "batched_ms": 1e3 * tm["batched"], "sequential_ms": 1e3 * tm["sequential"],
                    "base_batched_ms": 1e3 * tm["base"], "speedup": tm["sequential"] / tm["batched"],
                    # the ceiling: what batching gains the base alone, without any LoRA
                    "base_alone_speedup": tm["base_sequential"] / tm["base"]})
    return out


def _vs_peft(layer: _Layer, x: torch.Tensor, s: dict, device) -> dict:
    """One LoRA for the batch: ours (``plain`` path) / PEFT's ``lora.Linear`` on the same weights."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return {"skipped": "peft is not installed"}
    d, r = layer.a.shape[2], layer.a.shape[1]
    plain = copy.deepcopy(layer.linear)
    peft_model = get_peft_model(nn.Sequential(plain), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"],
                                                                  lora_dropout=0.0))
    peft_layer = peft_model.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.a[0])
        peft_layer.lora_B["default"].weight.copy_(layer.b[0])
    peft_layer.eval()
    with torch.no_grad(), layer.shared.mounted(layer.lora(rows=slice(0, 1))):
        torch.testing.assert_close(layer.wrapper(x), peft_layer(x), rtol=1e-3, atol=1e-3)
        tm = measure({"ours": lambda: layer.wrapper(x), "peft": lambda: peft_layer(x)}, device,
                      s["repeats"], s["min_time"])
    return {"d": d, "rank": r, "tokens": x.shape[1], "batch": x.shape[0], "ours_over_peft": tm["ours"] / tm["peft"],
            "path": layer.wrapper.last_path}


def mix(s: dict, device, dtype) -> list[dict]:
    """Batch 32 with 1, 6 and 32 distinct LoRAs: overhead over the base of each path. Groups are
    contiguous (a request expanded over several samples); 6 LoRAs also scattered (cache hits)."""
    n, d = 32, s["compare_dim"]
    r = 16 if d >= 256 else 4
    layer = _Layer(d, r, n, device, dtype)
    out = []
    for t in s["compare_tokens"][:2]:
        x = _inputs(n, t, d, device, dtype)
        for distinct, layout in ((1, "contiguous"), (6, "contiguous"), (6, "scattered"), (32, "distinct")):
            counts = [n // distinct + (i < n % distinct) for i in range(distinct)]
            lora = layer.lora() if distinct == n else layer.lora(rows=slice(0, distinct)).repeat_interleave(counts)
            if layout == "scattered":
                lora = lora[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
            fns = {"base": lambda: layer.linear(x)}
            with torch.no_grad(), layer.shared.mounted(lora):
                for path in ("auto", "per_sample", "segmented"):
                    def run(path=path):
                        with mount.lora_path(path):
                            return layer.wrapper(x)
                    fns[path] = run
                fns["auto"]()
                chosen = layer.wrapper.last_path
                tm = measure(fns, device, s["repeats"], s["min_time"])
            row = {"batch": n, "distinct": distinct, "layout": layout, "tokens": t, "d": d, "rank": r,
                   "chosen": chosen}
            row.update({f"{p}_overhead": tm[p] / tm["base"] - 1 for p in ("auto", "per_sample", "segmented")})
            row["best"] = min(("per_sample", "segmented"), key=lambda p: row[f"{p}_overhead"])
            out.append(row)
    return out


# ---------------------------------------------------------------- report


def _goals(result: dict) -> dict:
    """The issue's goals, checked on this run's numbers (reported, never asserted)."""
    over = [r for r in result["dynamic_overhead"] if r["tokens"] >= 64]
    worst = max((r["overhead_over_flop_share"] for r in over), default=None)
    decode = {r["d"]: r["speedup"] for r in result["batched_vs_sequential_decode"]}
    decode_base = {r["d"]: r["base_alone_speedup"] for r in result["batched_vs_sequential_decode"]}
    peft = [r["ours_over_peft"] for r in result["vs_peft"] if "ours_over_peft" in r]
    slopes = result["generator_scaling"]["slopes"]
    return {
        "overhead_within_2x_flop_share_at_tokens_ge_64": {
            "met": worst is not None and worst <= 2, "worst_overhead_over_flop_share": worst,
            "shapes_within": sum(r["overhead_over_flop_share"] <= 2 for r in over), "shapes": len(over)},
        "batched_decode_5x_faster_than_sequential": {
            "met_at_d": [d for d, v in decode.items() if v >= 5], "speedup_by_d": decode,
            "base_alone_speedup_by_d": decode_base},
        "no_slower_than_peft": {"met": bool(peft) and max(peft) <= 1.05,  # 5%: timing noise
                                "worst_ours_over_peft": max(peft, default=None)},
        "generator_factorized_linear_full_quadratic": {
            "factorized_time_slope": slopes["factorized"]["time"], "full_time_slope": slopes["full"]["time"],
            "factorized_time_slope_last": slopes["factorized"]["time_last"],
            "full_time_slope_last": slopes["full"]["time_last"],
            "factorized_memory_slope": slopes["factorized"]["memory"], "full_memory_slope": slopes["full"]["memory"]},
    }


def _fmt(v, spec=".3f"):
    return "-" if v is None else format(v, spec)


def format_table(result: dict) -> str:
    lines = [f"funcmem bench lora ({result['mode']}) on {result['device']}, {result['dtype']}, "
             f"{result['threads']} thread(s), torch {result['torch']}", "",
             "dynamic_overhead: (base + per-sample LoRA) / base, batch 16, every sample its own LoRA",
             f"{'d':>6} {'r':>4} {'tokens':>6} {'base ms':>9} {'ratio':>7} {'over-1':>7} {'flop_share':>10} "
             f"{'(r-1)/fs':>8} {'b*fs':>6}"]
    for r in result["dynamic_overhead"]:
        lines.append(f"{r['d']:>6} {r['rank']:>4} {r['tokens']:>6} {r['base_ms']:>9.3f} {r['ratio']:>7.3f} "
                     f"{r['overhead']:>7.3f} {r['flop_share']:>10.4f} {r['overhead_over_flop_share']:>8.2f} "
                     f"{r['factor_bytes_share']:>6.3f}")
    lines += ["", "speedup of the batched per-sample path (batch 16) over",
              f"{'tokens':>6} {'naive loop':>11} {'merge each':>11}"]
    for a, b in zip(result["vs_naive_loop"], result["vs_merge_per_sample"]):
        lines.append(f"{a['tokens']:>6} {a['speedup']:>11.2f} {b['speedup']:>11.2f}")
    lines += ["", "batched_vs_sequential_decode: 16 samples x 1 token, 16 LoRAs, one batched forward vs one at a time"]
    for r in result["batched_vs_sequential_decode"]:
        lines.append(f"  d {r['d']:>5} r {r['rank']:>3} (weight {r['weight_mb']:.0f} MB): {r['speedup']:.2f}x "
                     f"({r['sequential_ms']:.3f} ms -> {r['batched_ms']:.3f} ms); the base alone, no LoRA: "
                     f"{r['base_alone_speedup']:.2f}x")
    lines += ["", "vs_peft: one LoRA for the batch, ours / PEFT lora.Linear (<= 1: no slower)"]
    for r in result["vs_peft"]:
        lines.append(f"  tokens {r.get('tokens', '-'):>5}: {_fmt(r.get('ours_over_peft'))}" if "skipped" not in r
                     else f"  {r['skipped']}")
    lines += ["", "mix: batch 32, overhead over base of each path",
              f"{'tokens':>6} {'distinct':>8} {'layout':>10} {'chosen':>10} {'auto':>7} {'per_sample':>10} "
              f"{'segmented':>9}"]
    for r in result["mix"]:
        lines.append(f"{r['tokens']:>6} {r['distinct']:>8} {r['layout']:>10} {r['chosen']:>10} {r['auto_overhead']:>7.3f} "
                     f"{r['per_sample_overhead']:>10.3f} {r['segmented_overhead']:>9.3f}")
    gs = result["generator_scaling"]
    lines += ["", f"generator_scaling: one generation, S = {gs['positions']} tokens per layer",
              f"{'attention':>10} {'N':>4} {'ms':>9} {'peak MB':>9} {'attn GFLOP':>10}"]
    for r in gs["rows"]:
        mb = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**20
        lines.append(f"{r['attention']:>10} {r['layers']:>4} {r['ms']:>9.2f} {_fmt(mb, '.1f'):>9} "
                     f"{r['attention_flops'] / 1e9:>10.3f}")
    for k, v in gs["slopes"].items():
        lines.append(f"  log-log slope in N, {k}: time {_fmt(v['time'], '.2f')} (last two N: "
                     f"{_fmt(v['time_last'], '.2f')}), memory {_fmt(v['memory'], '.2f')}, "
                     f"attention FLOPs {_fmt(v['attention_flops'], '.2f')}")
    lines += ["", "generator_cost: per instance (batch 1)"]
    for r in result["generator_cost"]:
        lines.append(f"  {r['image_tokens']} image tokens: generate {r['generate_ms']:.2f} ms, base forward "
                     f"{r['base_forward_ms']:.2f} ms ({r['generate_over_forward']:.1f}x); generate once + 20 mounted "
                     f"forwards = {r['generate_once_reuse_20_over_base']:.2f}x 20 base forwards "
                     f"(generate every time: {r['generate_every_forward_20_over_base']:.2f}x)")
    t = result["train_step_ratio"]
    lines += ["", f"train_step_ratio: functional memory / shared LoRA step = {t['ratio']:.2f} "
              f"({t['functional_memory_ms']:.1f} ms / {t['shared_lora_ms']:.1f} ms, batch {t['batch']}); "
              f"the generator's own forward+backward is {t['generator_forward_backward_ms']:.1f} ms "
              f"({100 * t['generator_share_of_step']:.0f}% of the step)", "", "goals:"]
    for k, v in result["goals"].items():
        lines.append(f"  {k}: {json.dumps(v)}")
    return "\n".join(lines)


def run(mode: str = "full", out: str | Path = "runs/bench/lora.json", device: str | None = None,
        threads: int | None = None, dtype: str = "float32") -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this PyTorch sees no CUDA GPU; use --device cpu")
    dt = getattr(torch, dtype)
    s = SIZES[mode]
    torch.manual_seed(0)
    start = time.perf_counter()
    result = {"mode": mode, "device": dev.type if dev.type == "cpu" else torch.cuda.get_device_name(dev),
              "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "grad": "no_grad (inference) unless stated"}
    result["dynamic_overhead"] = dynamic_overhead(s, dev, dt)
    result.update(comparisons(s, dev, dt))
    result["batched_vs_sequential_decode"] = sequential_decode(s, dev, dt)
    result["mix"] = mix(s, dev, dt)
    result["generator_scaling"] = generator_scaling(s, mode, dev, torch.get_num_threads())
    result["generator_cost"] = generator_cost(s, mode, dev)
    result["train_step_ratio"] = train_step_ratio(s, mode, dev)
    result["goals"] = _goals(result)
    result["seconds"] = time.perf_counter() - start
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(format_table(result))
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``funcmem bench lora``'s options."""
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a subset of shapes (a few minutes on 2 CPU cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes: checks the command, numbers mean nothing")
    parser.add_argument("--out", default="runs/bench/lora.json")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser


def run_cli(args: argparse.Namespace) -> int:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    run(mode, args.out, args.device, getattr(args, "threads", None), args.dtype)  # funcmem --threads N
    return 0
