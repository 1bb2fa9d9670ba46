"""FunctionalMemory / SharedLoRA / LoRABank: save and load, routing, refusing a base with other shapes."""

import json

import pytest
import torch

import funcmem
from helpers import TinyTransformer, randomize_b_head

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    fm = funcmem.FunctionalMemory(TinyTransformer(), ["qkv", "fc1"], rank=4, alpha=8, condition_dim=12, generator=GEN)
    randomize_b_head(fm, 0.2)
    fm.save_pretrained(tmp_path / "gen")
    config = json.loads((tmp_path / "gen" / "config.json").read_text())
    assert {"generator", "targets", "rank", "alpha", "condition_dim", "funcmem_version"} <= set(config)
    torch.manual_seed(1)
    base2 = TinyTransformer()
    base2.load_state_dict(fm.base.state_dict())  # wrappers are transparent to state_dict
    fm2 = funcmem.FunctionalMemory.from_pretrained(tmp_path / "gen", base2)
    x, c = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    assert torch.equal(fm(c, x), fm2(c, x))
    assert not torch.equal(fm(c, x), fm.base(x))


def test_loading_onto_another_base_names_the_module(tmp_path):
    fm = funcmem.FunctionalMemory(TinyTransformer(dim=16), ["qkv"], rank=4, condition_dim=12, generator=GEN)
    fm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer(dim=24))
    with pytest.raises(ValueError, match="lacks"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer(depth=2))
    with pytest.raises(ValueError, match="SharedLoRA"):
        funcmem.SharedLoRA.from_pretrained(tmp_path, TinyTransformer())


def test_shared_lora_round_trip_and_same_mount_path(tmp_path):
    torch.manual_seed(0)
    base = TinyTransformer()
    shared = funcmem.SharedLoRA(base, ["qkv", "fc2"], rank=4, alpha=4)
    x = torch.randn(2, 5, 16)
    assert torch.equal(shared(x), base(x))  # B = 0 at init
    with torch.no_grad():
        for p in shared.lora_B.values():
            p.normal_()
    y = shared(x)
    with shared.mounted(shared.lora()):
        assert torch.equal(base(x), y)
    shared.save_pretrained(tmp_path)
    base2 = TinyTransformer()
    base2.load_state_dict(base.state_dict())
    assert torch.equal(funcmem.SharedLoRA.from_pretrained(tmp_path, base2)(x), y)


def test_generator_and_shared_lora_share_one_base():
    torch.manual_seed(0)
    base = TinyTransformer()
    fm = funcmem.FunctionalMemory(base, ["qkv"], rank=2, condition_dim=4, generator=GEN)
    shared = funcmem.SharedLoRA(base, ["qkv"], rank=2)
    assert fm._handles["blocks.0.attn.qkv"][0] is shared._handles["blocks.0.attn.qkv"][0]
    assert shared.num_trainable_parameters() == 3 * (2 * 16 + 48 * 2)
    assert fm.num_trainable_parameters() == fm.generator.count_parameters()


def test_lora_bank_routes_each_sample_to_its_lora_and_round_trips(tmp_path):
    """Sample i of a bank's output equals LoRA index[i] mounted alone; save/load is exact."""
    torch.manual_seed(0)
    base = TinyTransformer()
    bank = funcmem.LoRABank(base, ["qkv", "fc2"], rank=2, alpha=4, num=3)
    with torch.no_grad():
        for p in bank.lora_B.values():
            p.normal_()
    x, index = torch.randn(4, 5, 16), torch.tensor([2, 0, 2, 1])
    y = bank(index, x)
    for i, k in enumerate(index.tolist()):
        with bank.mounted(bank.lora()[k]):
            assert torch.allclose(base(x[i:i + 1]), y[i:i + 1], atol=1e-6)
    assert not torch.allclose(y[0], y[1])
    bank.save_pretrained(tmp_path)
    base2 = TinyTransformer()
    base2.load_state_dict(base.state_dict())
    assert torch.equal(funcmem.LoRABank.from_pretrained(tmp_path, base2)(index, x), y)
    with pytest.raises(ValueError, match="LoRABank"):
        funcmem.SharedLoRA.from_pretrained(tmp_path, TinyTransformer())


def test_lora_bank_refuses_factors_of_another_shape(tmp_path):
    funcmem.LoRABank(TinyTransformer(), ["qkv"], rank=2, num=3).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num": 4}))
    with pytest.raises(ValueError, match=r"does not fit.*qkv"):
        funcmem.LoRABank.from_pretrained(tmp_path, TinyTransformer())
