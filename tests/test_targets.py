"""Target resolution: PEFT-style patterns, clear errors, layer x slot grouping."""

import pytest
from torch import nn

from funcmem.targets import resolve_targets, split_layer
from helpers import MoE, TinyConvNet, TinyTransformer


def names(targets):
    return [t.name for t in targets]


def test_glob_suffix_and_regex_forms():
    m = TinyTransformer()
    glob = names(resolve_targets(m, ["blocks.*.attn.qkv"]))
    suffix = names(resolve_targets(m, ["qkv"]))
    regex = names(resolve_targets(m, r"blocks\.\d+\.attn\.qkv"))
    assert glob == suffix == regex == ["blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.2.attn.qkv"]
    assert names(resolve_targets(m, ["fc1", "fc2"], exclude=["blocks.1.*"])) == [
        "blocks.0.mlp.fc1", "blocks.0.mlp.fc2", "blocks.2.mlp.fc1", "blocks.2.mlp.fc2"]


def test_pattern_matching_nothing_lists_names():
    with pytest.raises(ValueError, match=r"'nope' matched no module.*blocks\.0\.attn\.qkv"):
        resolve_targets(TinyTransformer(), ["qkv", "nope"])


def test_module_that_cannot_take_lora_is_refused():
    with pytest.raises(ValueError, match="blocks.0.norm: LayerNorm"):
        resolve_targets(TinyTransformer(), ["norm"])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="groups=2"):
        resolve_targets(grouped, ["0"])


def test_kinds_and_shapes():
    conv = resolve_targets(TinyConvNet(), ["stages.*"])
    assert [(t.kind, t.in_features, t.out_features) for t in conv] == [("conv2d", 27, 8), ("conv2d", 72, 8)]
    experts = resolve_targets(MoE(), ["experts"])  # the module stands for its stacked weights
    assert names(experts) == ["layers.0.experts.gate_up", "layers.1.experts.gate_up"]
    assert experts[0].a_shape(4) == (3, 4, 8) and experts[0].b_shape(4) == (3, 6, 4)


def test_layer_and_slot():
    assert split_layer("blocks.3.attn.qkv") == ("blocks.3", "attn.qkv")
    assert split_layer("down.1.res.0.conv1") == ("down.1.res.0", "conv1")
    assert split_layer("head") == ("", "head")
