"""Bad targets, configs and checkpoints give clear errors listing what would have fit; and
property tests: tokenization round trips and mounting equals the dense update, over random shapes."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import funcmem
from funcmem.lora import LoRA
from funcmem.targets import resolve_targets
from funcmem.tokens import TokenLayout
from helpers import TinyConvNet, TinyTransformer, randomize_b_head

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- targets


def test_a_pattern_that_matches_nothing_lists_the_module_names():
    with pytest.raises(ValueError, match=r"'attn\.proj' matched no module\. Module names are: .*blocks\.0\.attn\.qkv"):
        resolve_targets(TinyTransformer(), ["qkv", "attn.proj"])
    with pytest.raises(ValueError, match="targets is empty"):
        resolve_targets(TinyTransformer(), [])
    with pytest.raises(ValueError, match="left no module"):
        resolve_targets(TinyTransformer(), ["qkv"], exclude=["qkv"])


def test_a_module_that_cannot_take_lora_says_why():
    with pytest.raises(ValueError, match=r"blocks\.0\.norm: LayerNorm \(LoRA takes nn\.Linear, nn\.Conv2d"):
        resolve_targets(TinyTransformer(), ["norm"])
    net = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"0: Conv2d with groups=2.*\n.*1: Conv2d with padding_mode='reflect'"):
        resolve_targets(net, ["0", "1"])


# ---------------------------------------------------------------- configs and checkpoints


def saved(tmp_path):
    torch.manual_seed(0)
    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv"], rank=4, condition_dim=12, generator=GEN)
    fm.save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_a_checkpoint_from_another_base_names_the_shapes(tmp_path):
    saved(tmp_path)
    with pytest.raises(ValueError, match=r"target 'blocks\.0\.attn\.qkv' is \[kind, in, out, experts\] = "
                                         r"\['linear', 16, 48, None\] in the checkpoint but \['linear', 24, 72, None\]"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer(dim=24))
    with pytest.raises(ValueError, match="target pattern 'qkv' matched no module"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyConvNet())


def test_config_fields_missing_unknown_or_damaged(tmp_path):
    config = saved(tmp_path)
    file = tmp_path / "config.json"
    file.write_text(json.dumps({k: v for k, v in config.items() if k not in ("rank", "condition_dim")}))
    with pytest.raises(ValueError, match=r"lacks fields \['rank', 'condition_dim'\]; a FunctionalMemory config needs"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())
    file.write_text(json.dumps({**config, "generator": {**config["generator"], "widht": 3}}))
    with pytest.raises(ValueError, match=r"unknown GeneratorConfig fields \['widht'\]; known: \[.*'d_model'"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())
    file.write_text(json.dumps(config)[:-20])
    with pytest.raises(ValueError, match=r"cannot read .*config\.json as JSON"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())
    file.write_text(json.dumps({**config, "generator": {**config["generator"], "d_model": 64}}))
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit the model its config\.json describes "
                                         r"\(41 shapes differ\): hidden_in.weight: \(32, 12\) in the file, "
                                         r"\(64, 12\) in the model"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())


def test_a_trainer_checkpoint_that_is_cut_is_refused_by_name(tmp_path):
    from funcmem.train import Trainer, TrainConfig

    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv"], rank=2, condition_dim=12, generator=GEN)
    cfg = TrainConfig(steps=2, warmup_steps=1, out_dir=str(tmp_path), progress=False, distributed="none")
    batch = (torch.randn(2, 3, 12), torch.randn(2, 5, 16))
    Trainer(fm, lambda m, b: m(*b).pow(2).mean(), cfg).fit(lambda s: batch)
    ckpt = tmp_path / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cannot read .*checkpoint\.safetensors as safetensors"):
        Trainer(fm, lambda m, b: m(*b).pow(2).mean(), cfg).fit(lambda s: batch, resume=True)


# ---------------------------------------------------------------- property tests


@st.composite
def targets_and_lora(draw):
    """Random Linear / Conv2d / expert targets with matching random factors."""
    from funcmem.targets import Target

    rank, n = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    layers, slots = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    targets = []
    for layer in range(layers):
        for slot in range(slots):
            kind = draw(st.sampled_from(["linear", "conv2d", "experts"]))
            targets.append(Target(f"blocks.{layer}.s{slot}", kind, draw(st.integers(1, 9)), draw(st.integers(1, 9)),
                                  draw(st.integers(1, 3)) if kind == "experts" else None))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    lora = LoRA({t.name: (torch.randn(n, *t.a_shape(rank), generator=g), torch.randn(n, *t.b_shape(rank), generator=g))
                 for t in targets}, 0.5)
    return targets, rank, lora


@settings(max_examples=40, deadline=None)
@given(targets_and_lora(), st.integers(1, 24))
def test_tokenize_detokenize_round_trips_bit_for_bit(case, token_dim):
    targets, rank, lora = case
    layout = TokenLayout.from_targets(targets, rank, token_dim)
    tokens = layout.tokenize(lora)
    assert tokens.shape == (lora.batch_size, layout.num_layers, layout.tokens_per_layer, rank, token_dim)
    back = layout.detokenize(tokens, lora.scale)
    assert all(torch.equal(back.factors[k][j], lora.factors[k][j]) for k in lora.factors for j in (0, 1))
    assert torch.equal(layout.tokenize(back), tokens)


class Net(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=2, max_size=4), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 3), st.integers(0, 2**16))
def test_mounting_equals_the_dense_per_sample_update(dims, rank, batch, seq, seed):
    torch.manual_seed(seed)
    net = Net(dims).double()
    dense = Net(dims).double()
    dense.load_state_dict(net.state_dict())
    shared = funcmem.SharedLoRA(net, ["layers.*"], rank=rank, alpha=2 * rank)
    g = torch.Generator().manual_seed(seed)
    lora = LoRA({f"layers.{i}": (torch.randn(batch, rank, a, generator=g, dtype=torch.float64),
                                 torch.randn(batch, b, rank, generator=g, dtype=torch.float64))
                 for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))}, shared.scale)
    x = torch.randn(batch, seq, dims[0], generator=g, dtype=torch.float64)
    with shared.mounted(lora):
        y = net(x)
    for i in range(batch):
        with torch.no_grad():
            for k, layer in enumerate(dense.layers):
                a, b = lora.factors[f"layers.{k}"]
                layer.weight.copy_(shared.base.layers[k].base_layer.weight + lora.scale * b[i] @ a[i])
        torch.testing.assert_close(y[i], dense(x[i]))
    shared.merge(lora[0])
    torch.testing.assert_close(net(x[:1]), y[:1])
    shared.unmerge()


def test_generator_output_is_bounded_and_finite_for_extreme_conditions():
    torch.manual_seed(0)
    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv"], rank=4, condition_dim=12, generator=GEN)
    randomize_b_head(fm, 0.2)
    for c in (torch.full((2, 3, 12), 1e30), torch.full((2, 3, 12), -1e30), torch.zeros(2, 1, 12)):
        lora = fm.generate(c)  # the input RMSNorm keeps huge conditions finite
        assert all(torch.isfinite(t).all() for ab in lora.factors.values() for t in ab)
