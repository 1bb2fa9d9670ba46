"""Generator costs: how one generation grows with the base's depth (factorized vs full
attention), what it costs next to a base forward, and a training step against a shared LoRA's.

The base is ``EditorSizedBase``, a stand-in with the editing demo's width, depth and target
names, so these figures need no application installed.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..generator import GeneratorConfig, ParameterGenerator, attention_flops
from ..bank import SharedLoRA
from ..memory import FunctionalMemory
from .timing import measure, slope

EDITOR_TARGETS = ["img_attn.qkv", "img_attn.proj", "img_mlp.fc1", "img_mlp.fc2"]


def _generator_shape(mode: str) -> dict:
    """Generator size and tokens per layer: the demo's (editor targets, rank 8) or a tiny one."""
    if mode == "smoke":
        return dict(config=dict(d_model=32, depth=1, head_dim=16, token_dim=16), tokens_per_layer=4, a_tokens=2,
                    rank=4, condition_dim=32)
    return dict(config=dict(d_model=128, depth=2, head_dim=32, token_dim=64), tokens_per_layer=27, a_tokens=12,
                rank=8, condition_dim=384)


def _make_generator(shape: dict, layers: int, attention: str) -> ParameterGenerator:
    cfg = GeneratorConfig(**shape["config"], attention=attention)
    return ParameterGenerator(cfg, shape["condition_dim"], layers, shape["tokens_per_layer"], shape["a_tokens"],
                              shape["rank"]).eval()


def peak_child(spec: str) -> None:
    """In a fresh process: build a generator, reset the resident high-water mark, generate once,
    print the rise of the high-water mark over the resident size before (bytes)."""
    args = json.loads(spec)
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    gen = _make_generator(args["shape"], args["layers"], args["attention"])
    cond = torch.randn(1, 16, args["shape"]["condition_dim"])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    before = _proc_status("VmRSS")
    with torch.no_grad():
        gen(cond)
    print(json.dumps({"peak_bytes": _proc_status("VmHWM") - before}))


def _proc_status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _peak_memory(shape: dict, layers: int, attention: str, threads: int) -> int | None:
    """Peak extra resident memory of one generation (CPU, Linux), measured in a fresh process."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    spec = json.dumps({"shape": shape, "layers": layers, "attention": attention, "threads": threads})
    code = f"from funcmem.benchmarks.generator_speed import peak_child; peak_child({spec!r})"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    except (subprocess.SubprocessError, OSError, ValueError, KeyError):
        return None


def generator_scaling(s: dict, mode: str, device, threads: int) -> dict:
    shape = _generator_shape(mode)
    positions = shape["tokens_per_layer"] * shape["rank"]  # S (dim_accumulation 1)
    cond = torch.randn(1, 16, shape["condition_dim"], device=device)
    rows = []
    for attention in ("factorized", "full"):
        for n in s["layers"]:
            gen = _make_generator(shape, n, attention).to(device)
            with torch.no_grad():
                tm = measure({"gen": lambda: gen(cond)}, device, max(3, s["repeats"] // 2), s["min_time"])
            flops = shape["config"]["depth"] * attention_flops(n, positions, shape["config"]["d_model"],
                                                               attention == "full")
            peak = None if mode == "smoke" or device.type != "cpu" else _peak_memory(shape, n, attention, threads)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                with torch.no_grad():
                    gen(cond)
                peak = torch.cuda.max_memory_allocated() - base_mem
            rows.append({"attention": attention, "layers": n, "positions": positions, "ms": 1e3 * tm["gen"],
                         "peak_bytes": peak, "attention_flops": flops})
    slopes = {}
    for attention in ("factorized", "full"):
        part = [r for r in rows if r["attention"] == attention]
        ns = [r["layers"] for r in part]
        slopes[attention] = {key: slope(ns, [r[field] for r in part]) for key, field in
                             (("time", "ms"), ("memory", "peak_bytes"), ("attention_flops", "attention_flops"))}
        slopes[attention]["time_last"] = slope(ns[-2:], [r["ms"] for r in part[-2:]])  # at the largest N
    memory_note = ("peak_bytes: rise of the resident-set high-water mark (VmHWM) over the resident size before "
                   "one generation, in a fresh process; includes allocator effects") if device.type == "cpu" else (
                   "peak_bytes: torch.cuda.max_memory_allocated over the allocated bytes before")
    return {"positions": positions, "rows": rows, "slopes": slopes, "memory_measured_as": memory_note}


class EditorSizedBase(nn.Module):
    """A stand-in of the editing demo's base editor: width-96 pre-norm transformer blocks with the
    editor's module names (``blocks.i.img_attn.qkv`` ...), so the demo's targets fit it.

    Shape: x (B, L, width) image tokens -> (B, L, width).
    """

    def __init__(self, width: int = 96, depth: int = 4, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            blk = nn.Module()
            blk.norm1, blk.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
            blk.img_attn, blk.img_mlp = nn.Module(), nn.Module()
            blk.img_attn.qkv, blk.img_attn.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
            blk.img_mlp.fc1, blk.img_mlp.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
            self.blocks.append(blk)

    def forward(self, x):
        for blk in self.blocks:
            q, k, v = blk.img_attn.qkv(blk.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
            x = x + blk.img_attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))
            x = x + blk.img_mlp.fc2(F.gelu(blk.img_mlp.fc1(blk.norm2(x))))
        return x


def _base(image_tokens: int, batch: int, device, smoke: bool):
    """(base, inputs, name): the editor-sized stand-in and a batch of image tokens for it."""
    width = 32 if smoke else 96
    base = EditorSizedBase(width, 1 if smoke else 4).to(device)
    g = torch.Generator().manual_seed(0)
    return base, (torch.randn(batch, image_tokens, width, generator=g).to(device),), "EditorSizedBase"


def _functional_memory(base: nn.Module, mode: str) -> FunctionalMemory:
    shape = _generator_shape(mode)
    return FunctionalMemory(base, EDITOR_TARGETS, rank=shape["rank"], alpha=2 * shape["rank"],
                            condition_dim=shape["condition_dim"], generator=GeneratorConfig(**shape["config"]))


def generator_cost(s: dict, mode: str, device, reuse: int = 20) -> list[dict]:
    """Per instance (batch 1): one generation vs one base forward, and generate once + reuse."""
    out = []
    for tokens in ((16,) if mode == "smoke" else (64, 256)):
        base, inputs, name = _base(tokens, 1, device, mode == "smoke")
        fm = _functional_memory(base, mode).to(device).eval()
        with torch.no_grad():
            fm.generator.model.proj_out_B.weight.normal_(std=0.02)  # a nonzero LoRA
        cond = torch.randn(1, 16, fm.condition_dim, device=device)
        with torch.no_grad():
            lora = fm.generate(cond)
            with fm.mounted(lora):
                fns = {"generate": lambda: fm.generate(cond), "base": lambda: base(*inputs),
                       "mounted": lambda: base(*inputs)}
                tm = measure({"generate": fns["generate"], "mounted": fns["mounted"]}, device, s["repeats"],
                              s["min_time"])
            tm["base"] = measure({"base": fns["base"]}, device, s["repeats"], s["min_time"])["base"]
        once = tm["generate"] + reuse * tm["mounted"]
        out.append({"base": name, "image_tokens": tokens, "generate_ms": 1e3 * tm["generate"],
                    "base_forward_ms": 1e3 * tm["base"], "mounted_forward_ms": 1e3 * tm["mounted"],
                    "generate_over_forward": tm["generate"] / tm["base"],
                    f"generate_once_reuse_{reuse}_ms": 1e3 * once,
                    f"generate_once_reuse_{reuse}_over_base": once / (reuse * tm["base"]),
                    f"generate_every_forward_{reuse}_over_base": reuse * (tm["generate"] + tm["mounted"])
                    / (reuse * tm["base"])})
    return out


def train_step_ratio(s: dict, mode: str, device) -> dict:
    """One optimizer step of functional memory / of a shared LoRA (rank 8), editor-sized base, batch 16."""
    batch = 4 if mode == "smoke" else 16
    base, inputs, name = _base(16 if mode == "smoke" else 64, batch, device, mode == "smoke")
    target = torch.randn_like(base(*inputs))
    fm_base, shared_base = copy.deepcopy(base), copy.deepcopy(base)
    fm = _functional_memory(fm_base, mode).to(device)
    shared = SharedLoRA(shared_base, EDITOR_TARGETS, rank=fm.rank, alpha=fm.alpha).to(device)
    cond = torch.randn(batch, 16, fm.condition_dim, device=device)

    def stepper(module, forward):
        opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(forward(), target)
            loss.backward()
            opt.step()
        return step

    def generator_alone():  # the generator's forward and backward, no base
        fm.generator.zero_grad(set_to_none=True)
        fm.generate(cond).flatten().square().mean().backward()

    fns = {"functional_memory": stepper(fm, lambda: fm(cond, *inputs)),
           "shared_lora": stepper(shared, lambda: shared(*inputs)), "generator_alone": generator_alone}
    tm = measure(fns, device, max(3, s["repeats"] // 2), s["min_time"])
    return {"base": name, "batch": batch, "targets": EDITOR_TARGETS, "rank": fm.rank,
            "generator": fm.generator_config.to_dict(), "functional_memory_ms": 1e3 * tm["functional_memory"],
            "shared_lora_ms": 1e3 * tm["shared_lora"], "ratio": tm["functional_memory"] / tm["shared_lora"],
            "generator_forward_backward_ms": 1e3 * tm["generator_alone"],
            "generator_share_of_step": tm["generator_alone"] / tm["functional_memory"]}
