"""Every application path (plain, per-sample, tiled, segmented) equals per-sample merged weights, in
float32, half precision and under torch.compile; gradients flow through every path."""

import shutil

import pytest
import torch

import funcmem
from funcmem import mount
from funcmem.lora import LoRA
from helpers import CASES, RANK, build, random_lora

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
@pytest.mark.parametrize("kind", list(CASES))
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


@pytest.mark.slow
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
