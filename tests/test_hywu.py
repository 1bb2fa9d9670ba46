"""HY-WU checkpoints: the reference fixture, sharded files, grouped experts, mounting on a base by
the checkpoint's own module paths, conversion both ways, and configs that do not fit."""

import copy
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

import funcmem
import funcmem.cli
from funcmem.hywu import HywuGenerator, convert_to_funcmem, convert_to_hywu, from_pretrained, load_generator


# ---------------------------------------------------------------- bases and checkpoints


class StackedExperts(nn.Module):
    """E stacked experts: ``gate_up_proj`` (E, 2h, d), ``down_proj`` (E, d, h).

    Input x (B, T, d), route (B, T) (the expert of each token) -> (B, T, d)."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(num_experts, 2 * hidden, dim) / dim ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(num_experts, dim, hidden) / hidden ** 0.5)

    def forward(self, x, route):
        gate, up = (self.gate_up_proj[route] @ x[..., None])[..., 0].chunk(2, dim=-1)  # (B, T, h) each
        return (self.down_proj[route] @ (F.silu(gate) * up)[..., None])[..., 0]


class MoELayer(nn.Module):
    def __init__(self, dim=24, hidden=16, num_experts=3, k_dim=8):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj, self.self_attn.k_proj = nn.Linear(dim, dim), nn.Linear(dim, k_dim)
        self.mlp = nn.Module()
        self.mlp.router = nn.Linear(dim, num_experts, bias=False)
        self.mlp.experts = StackedExperts(num_experts, dim, hidden)

    def forward(self, x):
        h = F.layer_norm(x, x.shape[-1:])
        k = self.self_attn.k_proj(h)
        x = x + torch.tanh(self.self_attn.q_proj(h)) + k.repeat(1, 1, x.shape[-1] // k.shape[-1])
        h = F.layer_norm(x, x.shape[-1:])
        return x + self.mlp.experts(h, self.mlp.router(h).argmax(-1))  # top-1 routing per token


class MoEModel(nn.Module):
    """``model.layers.{n}``: q_proj, k_proj and a routed MoE with stacked experts. Input (B, T, 24)."""

    def __init__(self, num_layers=2, **kw):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(MoELayer(**kw) for _ in range(num_layers))

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return x


class ViT(nn.Module):
    """``blocks.{n}``: attn.qkv, attn.proj, mlp.fc1, mlp.fc2 (the fixture's modules). Input (B, T, dim)."""

    def __init__(self, depth=3, dim=48, hidden=96):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.attn, block.mlp = nn.Module(), nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.blocks.append(block)
        with torch.no_grad():  # weights ~10x PyTorch's init: the fixture's random LoRA is large
            for p in self.parameters():
                p.mul_(10)

    def forward(self, x):
        for b in self.blocks:
            q, k, v = b.attn.qkv(F.layer_norm(x, x.shape[-1:])).chunk(3, -1)
            x = x + b.attn.proj(F.scaled_dot_product_attention(q, k, v))
            x = x + b.mlp.fc2(F.gelu(b.mlp.fc1(F.layer_norm(x, x.shape[-1:]))))
        return x


def grouped_config(**overrides):
    config = OrderedDict(
        model_type="parameter_generator", token_dim=16, rank=4, alpha=4, input_dim=10, d_model=32, head_dim=8,
        dim_accumulation=1, num_base_model_layers=2, output_dim=16, num_pg_layers=1, prefix="model.layers.",
        pg_mapping=OrderedDict([
            ("self_attn.q_proj", {"lora_A_dim": 24, "lora_B_dim": 24}),  # not in sorted order on purpose
            ("mlp.experts", {"type": "grouped", "num_experts": 3,
                             "sub_weights": OrderedDict([("gate_up_proj", {"lora_A_dim": 24, "lora_B_dim": 32}),
                                                         ("down_proj", {"lora_A_dim": 16, "lora_B_dim": 24})])}),
            ("self_attn.k_proj", {"lora_A_dim": 24, "lora_B_dim": 8}),
        ]))
    config.update(overrides)
    return config


def random_state(config, seed=0):
    """Generator weights for a config, with a nonzero B head (so every LoRA does something)."""
    torch.manual_seed(seed)
    gen = HywuGenerator(config)
    with torch.no_grad():
        gen.generator.model.proj_out_B.weight.normal_(std=0.05)
        gen.generator.model.proj_out_B.bias.normal_(std=0.01)
    return gen.generator.state_dict()


def write_checkpoint(path, config, state, shards=1):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state, str(path / "model.safetensors"))
        return
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(path / name))
        weight_map.update({k: name for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@torch.no_grad()
def reference_outputs(base, out, x):
    """By hand, one sample at a time: every target weight W -> W + scale * B_i @ A_i (per expert for
    stacked experts, (E, out, r) @ (E, r, in)), then the plain base. ``out`` is a generator's output dict."""
    scale = out["scale"].item()
    params = dict(base.named_parameters())
    ys = []
    for i in range(x.shape[0]):
        weights = {}
        for key in out:
            if key.endswith(".lora_A"):
                name = key[: -len(".lora_A")]
                pname = name if name in params else f"{name}.weight"  # stacked experts name the parameter
                delta = scale * (out[f"{name}.lora_B"][i] @ out[key][i])
                weights[pname] = params[pname] + delta.reshape(params[pname].shape)
        ys.append(functional_call(base, weights, (x[i : i + 1],)))
    return torch.cat(ys)


def max_diff(a, b):
    return (a - b).abs().max().item()


def rel_diff(a, ref):
    """max |a - ref| / max |ref|: float32 rounding is ~1e-7 of the outputs' size."""
    return max_diff(a, ref) / ref.abs().max().item()


# ---------------------------------------------------------------- loading


def test_reference_fixture_reproduced(hywu_fixture):
    gen = funcmem.hywu.load_generator(hywu_fixture)
    expected = load_file(f"{hywu_fixture}/expected.safetensors")
    out = gen(expected["condition"])
    keys = sorted(k for k in expected if k != "condition")
    assert sorted(out) == keys
    worst = max((out[k] - expected[k]).abs().max().item() for k in keys)
    print(f"HY-WU fixture max abs diff: {worst:.3g}")
    assert worst < 1e-4


def test_grouped_experts_and_sharded_checkpoint(tmp_path):
    config = grouped_config()
    state = random_state(config)
    write_checkpoint(tmp_path / "one", config, state)
    write_checkpoint(tmp_path / "sharded", config, state, shards=3)
    c = torch.randn(2, 5, 10)
    one, sharded = load_generator(tmp_path / "one")(c), load_generator(tmp_path / "sharded")(c)
    assert list(one) == list(sharded)
    for k in one:
        assert torch.equal(one[k], sharded[k])
    assert one["model.layers.1.mlp.experts.gate_up_proj.lora_A"].shape == (2, 3, 4, 24)
    assert one["model.layers.1.mlp.experts.down_proj.lora_B"].shape == (2, 3, 24, 4)
    # module order is pg_mapping's order as written, grouped entries expanded in place
    assert list(one)[:8:2] == ["model.layers.0.self_attn.q_proj.lora_A", "model.layers.0.mlp.experts.gate_up_proj.lora_A",
                               "model.layers.0.mlp.experts.down_proj.lora_A", "model.layers.0.self_attn.k_proj.lora_A"]
    assert one["scale"].item() == 1.0


def test_config_that_does_not_fit_its_weights(tmp_path):
    config = grouped_config()
    state = HywuGenerator(config).generator.state_dict()
    config["num_base_model_layers"] = 3
    write_checkpoint(tmp_path, config, state)
    with pytest.raises(ValueError, match=r"model\.layer_pos\.weight: checkpoint \(2, 32\) vs config \(3, 32\)"):
        load_generator(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layer_pos\.weight: checkpoint \(2, 32\) vs config \(3, 32\)"):
        from_pretrained(tmp_path, MoEModel(num_layers=3))
    with pytest.raises(ValueError, match=r"model\.layer_pos\.weight: checkpoint \(2, 32\) vs config \(3, 32\)"):
        convert_to_funcmem(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    config["num_base_model_layers"] = 2
    config["pg_mapping"]["self_attn.k_proj"]["lora_B_dim"] = 24  # k_proj B: 32 -> 96 numbers, 1 -> 2 tokens of 4 x 16
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.hw_pos\.weight: checkpoint \(\d+, 32\) vs config \(\d+, 32\)"):
        load_generator(tmp_path)
    del config["pg_mapping"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pg_mapping"):
        load_generator(tmp_path)
    bad = grouped_config()
    del bad["pg_mapping"]["mlp.experts"]["num_experts"]
    with pytest.raises(ValueError, match=r"grouped pg_mapping\['mlp.experts'\] lacks 'num_experts'"):
        HywuGenerator(bad)
    bad = grouped_config()
    del bad["pg_mapping"]["self_attn.k_proj"]["lora_B_dim"]
    with pytest.raises(ValueError, match=r"pg_mapping\['self_attn.k_proj'\] lacks 'lora_B_dim'"):
        HywuGenerator(bad)


# ---------------------------------------------------------------- mounting on a base


def test_fixture_mounts_on_a_base_by_its_module_paths(hywu_fixture):
    """The fixture's pg_mapping is sorted (attn.proj before attn.qkv) while the base registers qkv
    first: the token order must follow the checkpoint, not the base."""
    torch.manual_seed(0)
    base = ViT()
    clean = copy.deepcopy(base)
    fm = from_pretrained(hywu_fixture, base)
    expected = load_file(f"{hywu_fixture}/expected.safetensors")
    condition = expected["condition"]
    lora = fm.generate(condition)
    assert fm.guard.clipped == 0  # the default guard leaves these factors untouched
    got = lora.state_dict()
    keys = [k for k in expected if k not in ("condition", "scale")]
    assert sorted(got) == sorted(keys)
    generated = max(max_diff(got[k], expected[k]) for k in keys)
    x = torch.randn(condition.shape[0], 5, 48)
    with torch.no_grad(), fm.mounted(lora):
        y = base(x)
    ref = reference_outputs(clean, expected, x)
    mounted, effect = rel_diff(y, ref), rel_diff(clean(x), ref)
    print(f"fixture via from_pretrained: factors {generated:.3g}, mounted vs by hand {mounted:.3g} "
          f"(LoRA effect {effect:.3g}; both relative to max |y|)")
    assert generated < 1e-4 and mounted < 1e-5 and effect > 1e-2


def test_grouped_experts_mount_per_sample_per_expert(tmp_path):
    config = grouped_config()
    write_checkpoint(tmp_path, config, random_state(config))
    torch.manual_seed(1)
    base = MoEModel()
    clean = copy.deepcopy(base)
    fm = from_pretrained(tmp_path, base)
    assert [t.name for t in fm.targets if t.kind == "experts"] == [
        f"model.layers.{n}.mlp.experts.{w}" for n in range(2) for w in ("gate_up_proj", "down_proj")]
    c, x = torch.randn(3, 5, 10), torch.randn(3, 7, 24)
    out = load_generator(tmp_path)(c)
    lora = fm.generate(c)
    assert fm.guard.clipped == 0
    assert all(torch.equal(lora.state_dict()[k], out[k]) for k in out if k != "scale")
    with torch.no_grad(), fm.mounted(lora):
        y = base(x)
    ref = reference_outputs(clean, out, x)
    mounted, effect = rel_diff(y, ref), rel_diff(clean(x), ref)
    print(f"grouped experts: mounted vs by hand {mounted:.3g} (LoRA effect {effect:.3g}; relative to max |y|)")
    assert mounted < 1e-5 and effect > 1e-2


@pytest.mark.parametrize("overrides", [
    dict(rank=8, alpha=16, dim_accumulation=2, token_dim=8, output_dim=8, num_base_model_layers=1),
    dict(rank=2, alpha=1, dim_accumulation=2, token_dim=32, output_dim=32, num_base_model_layers=3, num_pg_layers=2,
         d_model=48, head_dim=12),
    dict(rank=4, alpha=8, dim_accumulation=4, token_dim=24, output_dim=24, num_base_model_layers=4, input_dim=6),
])
def test_other_dims(tmp_path, overrides):
    config = grouped_config(**overrides)
    write_checkpoint(tmp_path, config, random_state(config))
    torch.manual_seed(2)
    base = MoEModel(num_layers=config["num_base_model_layers"])
    clean = copy.deepcopy(base)
    fm = from_pretrained(tmp_path, base)
    c, x = torch.randn(2, 3, config["input_dim"]), torch.randn(2, 4, 24)
    out = load_generator(tmp_path)(c)
    assert out["model.layers.0.mlp.experts.down_proj.lora_A"].shape == (2, 3, config["rank"], 16)
    assert out["scale"].item() == config["alpha"] / config["rank"]
    with torch.no_grad(), fm.mounted(fm.generate(c)):
        y = base(x)
    ref = reference_outputs(clean, out, x)
    assert rel_diff(y, ref) < 1e-5 and rel_diff(clean(x), ref) > 1e-2


def test_base_that_does_not_fit_the_checkpoint(tmp_path):
    config = grouped_config()
    write_checkpoint(tmp_path, config, random_state(config))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj'.*base lacks"):
        from_pretrained(tmp_path, MoEModel(num_layers=1))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.experts\.gate_up_proj: "
                                         r".*\(E=3, out=32, in=24\).*\(E=4, out=32, in=24\)"):
        from_pretrained(tmp_path, MoEModel(num_experts=4))
    wrong = MoEModel()
    wrong.model.layers[0].self_attn.k_proj = nn.Linear(24, 12)
    with pytest.raises(ValueError, match=r"self_attn\.k_proj: .*\(in=24, out=8\).*\(in=24, out=12\)"):
        from_pretrained(tmp_path, wrong)


# ---------------------------------------------------------------- conversion


def test_conversion_round_trip_is_lossless(tmp_path):
    config = grouped_config()
    state = {k: v.to(torch.bfloat16) for k, v in random_state(config).items()}  # dtype must survive too
    write_checkpoint(tmp_path / "hywu", config, state, shards=2)
    assert funcmem.cli.main(["convert", "hywu-to-funcmem", str(tmp_path / "hywu"), str(tmp_path / "fm")]) == 0
    assert funcmem.cli.main(["convert", "funcmem-to-hywu", str(tmp_path / "fm"), str(tmp_path / "back")]) == 0
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(back) == sorted(state)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], state[k]) for k in state)
    written = json.loads((tmp_path / "back" / "config.json").read_text(), object_pairs_hook=OrderedDict)
    assert json.dumps(written) == json.dumps(config)  # same fields, same values, same key order
    # the funcmem directory loads with funcmem's own loader and gives the HY-WU checkpoint's outputs
    torch.manual_seed(3)
    base = MoEModel()
    fm_hywu = from_pretrained(tmp_path / "hywu", copy.deepcopy(base))
    fm_native = funcmem.FunctionalMemory.from_pretrained(tmp_path / "fm", copy.deepcopy(base))
    c, x = torch.randn(2, 5, 10), torch.randn(2, 6, 24)
    a, b = fm_hywu.generate(c), fm_native.generate(c)
    assert list(a.factors) == list(b.factors)
    assert all(torch.equal(a.factors[k][j], b.factors[k][j]) for k in a.factors for j in (0, 1))
    with torch.no_grad():
        assert torch.equal(fm_hywu(c, x), fm_native(c, x))
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_to_hywu(tmp_path / "fm", tmp_path / "back")


def test_funcmem_generator_to_hywu(tmp_path):
    """A generator trained in funcmem (default layout) becomes a HY-WU checkpoint with the same outputs."""
    torch.manual_seed(4)
    base = MoEModel()
    fm = funcmem.FunctionalMemory(base, ["q_proj", "experts", "k_proj"], rank=4, alpha=6, condition_dim=10,
                                  generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16))
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=0.05)
    fm.save_pretrained(tmp_path / "fm")
    convert_to_hywu(tmp_path / "fm", tmp_path / "hywu")
    config = json.loads((tmp_path / "hywu" / "config.json").read_text(), object_pairs_hook=OrderedDict)
    assert config["prefix"] == "model.layers." and config["alpha"] == 6
    assert list(config["pg_mapping"]) == ["self_attn.q_proj", "self_attn.k_proj", "mlp.experts"]
    c = torch.randn(2, 3, 10)
    out, lora = load_generator(tmp_path / "hywu")(c), fm.generate(c).state_dict()
    assert fm.guard.clipped == 0 and min(v.abs().max().item() for v in lora.values()) > 1e-2
    assert sorted(k for k in out if k != "scale") == sorted(lora)
    assert max(max_diff(out[k], lora[k]) for k in lora) == 0.0
    convert_to_funcmem(tmp_path / "hywu", tmp_path / "fm2")
    fm2 = funcmem.FunctionalMemory.from_pretrained(tmp_path / "fm2", copy.deepcopy(base))
    again = fm2.generate(c).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in lora.items())


def test_funcmem_generators_the_format_cannot_hold(tmp_path):
    gcfg = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)

    class Convs(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.ModuleDict({"conv": nn.Conv2d(3, 3, 3)}) for _ in range(2))

    funcmem.FunctionalMemory(Convs(), ["blocks.*"], rank=4, condition_dim=8, generator=gcfg).save_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match="no Conv2d targets"):
        convert_to_hywu(tmp_path / "c", tmp_path / "c_out")
    from helpers import TinyTransformer  # block 1's MLP is wider: shapes differ across layers

    funcmem.FunctionalMemory(TinyTransformer(), ["fc1"], rank=4, condition_dim=8, generator=gcfg).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=r"same shape in every layer; 'mlp\.fc1'"):
        convert_to_hywu(tmp_path / "t", tmp_path / "t_out")
    funcmem.FunctionalMemory(TinyTransformer(), ["fc2"], rank=4, condition_dim=8,
                             generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16,
                                                               mlp_ratio=2)).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"generator\.mlp_ratio = 4"):
        convert_to_hywu(tmp_path / "m", tmp_path / "m_out")
    for name, design in (("s", {"head": "slot"}), ("b", {"basis": 2}), ("d", {"modulation": True})):
        field, value = next(iter(design.items()))
        funcmem.FunctionalMemory(TinyTransformer(), ["fc2"], rank=4, condition_dim=8,
                                 generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16,
                                                                   **design)).save_pretrained(tmp_path / name)
        with pytest.raises(ValueError, match=rf"fixes generator\.{field} = .* cannot hold"):
            convert_to_hywu(tmp_path / name, tmp_path / f"{name}_out")


def test_format_path_builds_the_format_design_whatever_funcmem_defaults_are(monkeypatch, hywu_fixture):
    """``funcmem.hywu`` passes the format's design explicitly: changed defaults for new generators
    (here: every design option switched on) do not reach a HY-WU checkpoint."""
    import dataclasses

    from funcmem.generator import FORMAT_DESIGN, GeneratorConfig

    @dataclasses.dataclass
    class OtherDefaults(GeneratorConfig):
        head: str = "slot"
        basis: int = 3
        modulation: bool = True
        factor_init: str = "lora"

    monkeypatch.setattr(funcmem.hywu, "GeneratorConfig", OtherDefaults)
    cfg = funcmem.hywu.generator_config(funcmem.hywu.read_config(hywu_fixture))
    assert {k: getattr(cfg, k) for k in FORMAT_DESIGN} == FORMAT_DESIGN


class DiTLike(nn.Module):
    """Diffusers-style paths with numbers inside a layer: ``blocks.{n}.attn.to_q``, ``.ff.net.0.proj``,
    ``.ff.net.2``. Input (B, T, 16)."""

    def __init__(self, depth=2, dim=16):
        super().__init__()
        self.transformer_blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.attn, block.ff = nn.Module(), nn.Module()
            block.attn.to_q = nn.Linear(dim, dim)
            block.ff.net = nn.ModuleList([nn.Module(), nn.GELU(), nn.Linear(4 * dim, dim)])
            block.ff.net[0].proj = nn.Linear(dim, 4 * dim)
            self.transformer_blocks.append(block)

    def forward(self, x):
        for b in self.transformer_blocks:
            x = x + torch.tanh(b.attn.to_q(x))
            x = x + b.ff.net[2](b.ff.net[1](b.ff.net[0].proj(x)))
        return x


def test_module_paths_with_numbers(tmp_path):
    """funcmem's default grouping would split ``ff.net.0.proj`` at its last number; the checkpoint's
    own grid (prefix + layer, pg_mapping paths) decides instead, through conversion too."""
    config = grouped_config(prefix="transformer_blocks.", input_dim=6, pg_mapping=OrderedDict([
        ("ff.net.0.proj", {"lora_A_dim": 16, "lora_B_dim": 64}), ("attn.to_q", {"lora_A_dim": 16, "lora_B_dim": 16}),
        ("ff.net.2", {"lora_A_dim": 64, "lora_B_dim": 16})]))
    write_checkpoint(tmp_path / "hywu", config, random_state(config))
    torch.manual_seed(5)
    clean = DiTLike()
    fm = from_pretrained(tmp_path / "hywu", copy.deepcopy(clean))
    c, x = torch.randn(2, 3, 6), torch.randn(2, 5, 16)
    out = load_generator(tmp_path / "hywu")(c)
    with torch.no_grad(), fm.mounted(fm.generate(c)):
        y = fm.base(x)
    ref = reference_outputs(clean, out, x)
    assert rel_diff(y, ref) < 1e-5 and rel_diff(clean(x), ref) > 1e-2
    convert_to_funcmem(tmp_path / "hywu", tmp_path / "fm")
    convert_to_hywu(tmp_path / "fm", tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_text() == json.dumps(config, indent=2) + "\n"
    native = funcmem.FunctionalMemory.from_pretrained(tmp_path / "fm", copy.deepcopy(clean))
    with torch.no_grad():
        assert torch.equal(native(c, x), y)
