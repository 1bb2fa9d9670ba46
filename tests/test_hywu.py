"""HY-WU checkpoints: the reference fixture, sharded files, grouped experts, bad configs."""

import json
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file

import funcmem
from funcmem.hywu import HywuGenerator, load_generator


def test_reference_fixture_reproduced(hywu_fixture):
    gen = funcmem.hywu.load_generator(hywu_fixture)
    expected = load_file(f"{hywu_fixture}/expected.safetensors")
    out = gen(expected["condition"])
    keys = sorted(k for k in expected if k != "condition")
    assert sorted(out) == keys
    worst = max((out[k] - expected[k]).abs().max().item() for k in keys)
    print(f"HY-WU fixture max abs diff: {worst:.3g}")
    assert worst < 1e-4


def grouped_config():
    return OrderedDict(
        model_type="parameter_generator", token_dim=16, rank=4, alpha=4, input_dim=10, d_model=32, head_dim=8,
        dim_accumulation=1, num_base_model_layers=2, output_dim=16, num_pg_layers=1, prefix="model.layers.",
        pg_mapping=OrderedDict([
            ("self_attn.q_proj", {"lora_A_dim": 24, "lora_B_dim": 24}),  # not in sorted order on purpose
            ("mlp.experts", {"type": "grouped", "num_experts": 3,
                             "sub_weights": OrderedDict([("gate_up_proj", {"lora_A_dim": 24, "lora_B_dim": 32}),
                                                         ("down_proj", {"lora_A_dim": 16, "lora_B_dim": 24})])}),
            ("self_attn.k_proj", {"lora_A_dim": 24, "lora_B_dim": 8}),
        ]))


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


def test_grouped_experts_and_sharded_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = grouped_config()
    gen = HywuGenerator(config)
    with torch.no_grad():
        gen.generator.model.proj_out_B.weight.normal_()
    write_checkpoint(tmp_path / "one", config, gen.generator.state_dict())
    write_checkpoint(tmp_path / "sharded", config, gen.generator.state_dict(), shards=3)
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
    del config["pg_mapping"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pg_mapping"):
        load_generator(tmp_path)
