"""Fast dynamic LoRA: every application path equals per-sample merged weights, in float32, half
precision and under torch.compile; the dispatcher segments repeated LoRAs; gradients flow
through every path; ``funcmem bench`` writes its report. No timing is asserted here."""

import json
import shutil

import pytest
import torch

import funcmem
from funcmem import mount
from funcmem.layers import routing
from funcmem.lora import LoRA
from helpers import MoE, TinyConvNet, TinyTransformer

RANK = 3
BASES = {
    "linear": (TinyTransformer, ["qkv", "fc1", "fc2", "head"], lambda n: (torch.randn(n, 5, 16),)),
    "conv2d": (TinyConvNet, ["stages.*", "out"], lambda n: (torch.randn(n, 3, 9, 9),)),
    "experts": (MoE, ["experts", "proj"], lambda n: (torch.randn(n, 4, 8), torch.randint(3, (n, 4)))),
}
# How 8 input samples meet the LoRA: (factor rows, index or None)
LAYOUTS = {
    "distinct": (8, None),  # n == b
    "cfg_copies": (4, None),  # n divides b: sample i uses row i % 4
    "broadcast": (1, None),
    "index_grouped": (3, torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])),  # one request, several samples
    "index_scattered": (3, torch.tensor([2, 0, 2, 1, 0, 0, 2, 1])),  # cache hits anywhere in the batch
    "index_cfg": (3, torch.tensor([1, 0, 1, 2])),  # an index of 4, tiled over 8 samples
}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(kind, dtype=torch.float32):
    torch.manual_seed(0)
    make, targets, inputs = BASES[kind]
    base = make().to(dtype)
    fm = funcmem.FunctionalMemory(base, targets, rank=RANK, alpha=6, condition_dim=4,
                                  generator=funcmem.GeneratorConfig(d_model=16, depth=1, head_dim=8, token_dim=8))
    return base, fm, inputs


def random_lora(fm, rows, index=None, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(rows)
    factors = {t.name: tuple((0.3 * torch.randn(rows, *shape, generator=g)).to(dtype).requires_grad_(requires_grad)
                             for shape in (t.a_shape(fm.rank), t.b_shape(fm.rank))) for t in fm.targets}
    return LoRA(factors, fm.scale, index)


def reference(base, fm, lora, args):
    """Each sample alone through the base with its LoRA merged into the weights."""
    outs = []
    for i in range(args[0].shape[0]):
        fm.merge(lora[i % len(lora)])
        outs.append(base(*(a[i:i + 1] for a in args)))
        fm.unmerge()
    return torch.cat(outs)


@pytest.mark.parametrize("path", mount.PATHS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", list(BASES))
def test_every_path_equals_merged_reference(kind, layout, path):
    base, fm, inputs = build(kind)
    rows, index = LAYOUTS[layout]
    lora, args = random_lora(fm, rows, index), inputs(8)
    with torch.no_grad():
        expected = reference(base, fm, lora, args)
        with mount.lora_path(path), fm.mounted(lora):
            got = base(*args)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)  # float32 through 3 blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", mount.PATHS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_half_precision_computes_in_the_input_dtype(kind, path, dtype):
    """One layer in half precision (its rounding isolated from a deep net's) vs a float32
    reference on the same rounded weights, factors and inputs."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 12) if kind == "linear" else torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(8, 5, 16) if kind == "linear" else torch.randn(8, 3, 6, 6)
    base = torch.nn.Sequential(layer.to(dtype).float())  # weights exactly representable in dtype
    fm = funcmem.SharedLoRA(base, ["0"], rank=RANK)
    lora = random_lora(fm, 3, LAYOUTS["index_scattered"][1], dtype=dtype).to(torch.float32)
    x = x.to(dtype)
    with torch.no_grad():
        expected = reference(base, fm, lora, (x.float(),))
        base.to(dtype)
        with mount.lora_path(path), fm.mounted(lora):  # float32 factors meet a half-precision input
            got = base(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


def test_dispatcher_segments_repeated_loras():
    """The auto choice on a d=1024, rank-16 layer and a batch of 32 (cost model, no timing)."""
    row, cpu = 16 * 2048, torch.device("cpu")  # factor elements of one LoRA: r (in + out)
    grouped = torch.arange(6).repeat_interleave(torch.tensor([6, 6, 5, 5, 5, 5]))
    scattered = grouped[torch.randperm(32, generator=torch.Generator().manual_seed(0))]

    def choice(index, tokens):
        return routing.choose_path(routing.Routing(int(index.max()) + 1, index), 32, row, tokens * 2048, cpu)

    assert choice(torch.zeros(32, dtype=torch.long), 1024) == "segmented"  # one LoRA: plain on the batch
    assert choice(grouped, 1) == choice(grouped, 1024) == "segmented"  # contiguous groups: slices
    assert choice(scattered, 1) == "segmented"  # decode-like: factor reads dominate
    assert choice(scattered, 64) == "per_sample"  # many tokens: gathering activations would dominate
    assert choice(torch.randperm(32), 1) == "per_sample"  # nothing repeats
    small = routing.choose_path(routing.Routing(16, torch.arange(16).repeat_interleave(2)), 32, 3 * 64, 64, cpu)
    assert small == "per_sample"  # many tiny groups: the per-group cost wins


def test_wrappers_record_the_path_they_take():
    base, fm, inputs = build("linear")
    qkv, x = base.blocks[0].attn.qkv, inputs(8)[0]
    with torch.no_grad():
        for layout, path in [("distinct", "per_sample"), ("cfg_copies", "tiled"), ("broadcast", "plain")]:
            with fm.mounted(random_lora(fm, *LAYOUTS[layout])):
                base(x)
            assert qkv.last_path == path, layout
        two_requests = random_lora(fm, 2).repeat_interleave(4)  # 2 LoRAs, 4 samples each
        with fm.mounted(two_requests):
            base(x)
        assert qkv.last_path == "segmented"
        with mount.lora_path("per_sample"), fm.mounted(two_requests):
            base(x)
        assert qkv.last_path == "per_sample"
    assert mount.current_path() == "auto"
    with pytest.raises(ValueError, match="unknown LoRA path"):
        mount.set_lora_path("triton")


def test_routing_groups_scattered_samples_once():
    r = routing.Routing(3, torch.tensor([2, 0, 2, 1, 0, 0, 2, 1]))
    groups = r.groups(8, torch.device("cpu"))
    assert groups.rows == [0, 1, 2] and groups.bounds == [0, 3, 5, 8]
    assert groups.order.tolist() == [1, 4, 5, 3, 7, 0, 2, 6]
    assert r.groups(8, torch.device("cpu")) is groups  # computed once per batch size, shared by targets
    contiguous = routing.Routing(2, torch.tensor([1, 1, 0])).groups(3, torch.device("cpu"))
    assert contiguous.order is None and contiguous.rows == [1, 0]  # slices of the batch, no copy
    with pytest.raises(IndexError, match="rows 0..5"):
        routing.Routing(3, torch.tensor([0, 5])).groups(2, torch.device("cpu"))


@pytest.mark.parametrize("path", mount.PATHS)
@pytest.mark.parametrize("layout", ["distinct", "cfg_copies", "broadcast", "index_scattered", "index_cfg"])
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_flow_through_every_path(kind, layout, path):
    """float64 gradcheck on a tiny layer: to the factors and to the input."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = torch.nn.Linear(3, 2).double(), torch.randn(8, 2, 3, dtype=torch.float64)
    else:
        layer, x = torch.nn.Conv2d(2, 2, 3, padding=1).double(), torch.randn(8, 2, 3, 3, dtype=torch.float64)
    shared = funcmem.SharedLoRA(torch.nn.Sequential(layer), ["0"], rank=2)
    wrapper, t = shared.base[0], shared.targets[0]
    rows, index = LAYOUTS[layout]
    a = torch.randn(rows, *t.a_shape(2), dtype=torch.float64, requires_grad=True)
    b = torch.randn(rows, *t.b_shape(2), dtype=torch.float64, requires_grad=True)

    def f(a, b, x):
        with mount.lora_path(path), shared.mounted(LoRA({t.name: (a, b)}, 0.5, index)):
            return wrapper(x)

    assert torch.autograd.gradcheck(f, (a, b, x.requires_grad_()))


def test_generated_lora_trains_through_segmented_path():
    """A generator's output reaches its parameters through the grouped path too."""
    base, fm, inputs = build("linear")
    from helpers import randomize_b_head

    randomize_b_head(fm)
    lora = fm.generate(torch.randn(2, 3, 4)).repeat_interleave([3, 1])
    with mount.lora_path("segmented"), fm.mounted(lora):
        base(*inputs(4)).square().mean().backward()
    grads = [p.grad for p in fm.generator.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_lora_index_selects_samples():
    fm = build("linear")[1]
    plain = random_lora(fm, 3)
    lora = LoRA(plain.factors, plain.scale, torch.tensor([2, 0, 2, 1]))
    assert lora.batch_size == 3 and len(lora) == lora.num_samples == 4
    name = fm.targets[0].name
    assert torch.equal(lora[2].factors[name][0], plain.factors[name][0][2:3]) and lora[2].index is None
    part = lora[1:3]
    assert part.index.tolist() == [0, 2] and part.factors[name][0] is plain.factors[name][0]  # factors shared
    assert lora.detach().index is lora.index and lora.to(torch.float64).index.tolist() == [2, 0, 2, 1]
    assert LoRA.cat([lora, plain]).index.tolist() == [2, 0, 2, 1, 3, 4, 5]
    assert plain.repeat_interleave([2, 0, 1]).index.tolist() == [0, 0, 2]
    assert lora.repeat_interleave(2).index.tolist() == [2, 2, 0, 0, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="1-D integer tensor"):
        LoRA(plain.factors, plain.scale, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="LoRA batch 4 does not divide the input batch 6"):
        with fm.mounted(lora):
            fm.base(torch.randn(6, 5, 16))


def _compiler_available() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        return "torch.compile (inductor) on CPU needs a C++ compiler; none on PATH"
    return None


@pytest.mark.skipif(_compiler_available() is not None, reason=str(_compiler_available()))
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch internals
def test_per_sample_path_compiles_without_graph_breaks():
    torch.manual_seed(0)
    torch._dynamo.reset()
    shared = funcmem.SharedLoRA(torch.nn.Sequential(torch.nn.Linear(16, 12)), ["0"], rank=4)
    wrapper, t = shared.base[0], shared.targets[0]
    compiled = torch.compile(wrapper, fullgraph=True)  # fullgraph: a graph break is an error
    x = torch.randn(4, 3, 16)
    a, b = torch.randn(4, *t.a_shape(4)), torch.randn(4, *t.b_shape(4))
    for index in (None, torch.tensor([1, 1, 0, 3])):  # with an index: per-sample gather, no host read
        lora = LoRA({t.name: (a, b)}, 0.5, index)
        with torch.no_grad(), shared.mounted(lora):
            eager = wrapper(x)
            torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_bench_smoke_writes_every_section(tmp_path):
    from funcmem.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--smoke", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {"dynamic_overhead", "vs_naive_loop", "vs_merge_per_sample", "vs_peft", "batched_vs_sequential_decode",
            "mix", "generator_scaling", "generator_cost", "train_step_ratio", "goals"} <= set(result)
    assert {"ratio", "flop_share"} <= set(result["dynamic_overhead"][0])
    assert {r["distinct"] for r in result["mix"]} == {1, 6, 32}
    assert {"auto_overhead", "per_sample_overhead", "segmented_overhead"} <= set(result["mix"][0])
    assert {"factorized", "full"} == set(result["generator_scaling"]["slopes"])
    assert result["train_step_ratio"]["ratio"] > 0
