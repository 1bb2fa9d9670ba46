"""PEFT adapters: a generated instance or a SharedLoRA exported and loaded by ``peft`` gives
funcmem's mounted output; a PEFT adapter loaded as a SharedLoRA gives PEFT's output; what funcmem
cannot represent is refused by name."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import funcmem

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from test_hywu import MoEModel, ViT  # noqa: E402  (routed MoE with stacked (E, out, in) experts)

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)


class ConvMLP(nn.Module):
    """conv (3 -> 4, 3x3) -> tokens (B, 36, 4) -> fc1 (4 -> 16) -> GELU -> fc2 (16 -> 8). Input (B, 3, 6, 6)."""

    def __init__(self, dilation=1):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=dilation, dilation=dilation)
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 8)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, H*W, 4)
        return self.fc2(F.gelu(self.fc1(h)))


def max_diff(a, b):
    return (a - b).abs().max().item()


def generated(base, targets, condition, std=0.005):
    """A FunctionalMemory with a nonzero B head and the LoRA it generates for ``condition``."""
    fm = funcmem.FunctionalMemory(base, targets, rank=4, alpha=8, condition_dim=condition.shape[-1], generator=GEN)
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=std)
    lora = fm.generate(condition)
    assert fm.guard.clipped == 0
    return fm, lora


def test_generated_instance_exports_to_peft(tmp_path):
    torch.manual_seed(0)
    clean = ConvMLP()
    fm, lora = generated(copy.deepcopy(clean), ["conv", "fc1", "fc2"], torch.randn(3, 5, 10))
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad(), fm.mounted(lora):
        y = fm.base(x)
    for i in (0, 2):
        fm.export_peft(lora, i, tmp_path / f"a{i}", base_model_name_or_path="conv-mlp")
        model = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path / f"a{i}").eval()
        with torch.no_grad():
            got = model(x[i : i + 1])
        diff, effect = max_diff(got, y[i : i + 1]), max_diff(clean(x[i : i + 1]), y[i : i + 1])
        print(f"PEFT load of generated instance {i}: max abs diff {diff:.3g} (LoRA effect {effect:.3g})")
        assert diff < 1e-5 and effect > 1e-2
    config = json.loads((tmp_path / "a0" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8)
    assert config["target_modules"] == ["conv", "fc1", "fc2"] and config["base_model_name_or_path"] == "conv-mlp"
    # a LoRA with an index (samples sharing rows): sample 3 of lora.repeat_interleave(2) is row 1
    fm.export_peft(lora.repeat_interleave(2), 3, tmp_path / "shared_row")
    model = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path / "shared_row").eval()
    with torch.no_grad():
        assert max_diff(model(x[1:2]), y[1:2]) < 1e-5
    with pytest.raises(IndexError, match="sample 3 out of range"):
        fm.export_peft(lora, 3, tmp_path / "nope")


def test_shared_lora_exports_to_peft(tmp_path):
    torch.manual_seed(1)
    clean = ConvMLP()
    shared = funcmem.SharedLoRA(copy.deepcopy(clean), ["conv", "fc1", "fc2"], rank=3, alpha=5)
    with torch.no_grad():
        for p in shared.lora_B.values():
            p.normal_(std=0.3)
    shared.export_peft(tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path).eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want, got = shared(x), model(x)
    print(f"SharedLoRA -> PEFT: max abs diff {max_diff(got, want):.3g} (LoRA effect {max_diff(clean(x), want):.3g})")
    assert max_diff(got, want) < 1e-5 and max_diff(clean(x), want) > 1e-2


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_initialises_shared_lora(tmp_path, rslora):
    torch.manual_seed(2)
    clean = ConvMLP()
    model = get_peft_model(copy.deepcopy(clean), LoraConfig(r=4, lora_alpha=6, target_modules=["conv", "fc1", "fc2"],
                                                            init_lora_weights=False, use_rslora=rslora))
    model.save_pretrained(tmp_path)  # init_lora_weights=False: lora_B random, not zero
    shared = funcmem.SharedLoRA.from_peft(copy.deepcopy(clean), tmp_path)
    assert sorted(t.name for t in shared.targets) == ["conv", "fc1", "fc2"]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        want, got = model.eval()(x), shared(x)
    print(f"PEFT -> SharedLoRA (rslora={rslora}): max abs diff {max_diff(got, want):.3g} "
          f"(LoRA effect {max_diff(clean(x), want):.3g})")
    assert max_diff(got, want) < 1e-5 and max_diff(clean(x), want) > 1e-2


def test_grouped_experts_both_ways(tmp_path):
    """Stacked (E, out, in) experts travel as PEFT ``target_parameters``."""
    torch.manual_seed(3)
    clean = MoEModel()
    fm, lora = generated(copy.deepcopy(clean), ["q_proj", "experts"], torch.randn(2, 4, 10))
    x = torch.randn(2, 5, 24)
    with torch.no_grad(), fm.mounted(lora):
        y = fm.base(x)
    fm.export_peft(lora, 1, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_parameters"] == [f"model.layers.{n}.mlp.experts.{w}" for n in range(2)
                                           for w in ("gate_up_proj", "down_proj")]
    model = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path / "out").eval()
    with torch.no_grad():
        got = model(x[1:2])
    scale = y.abs().max().item()
    print(f"experts, generated -> PEFT: max abs diff {max_diff(got, y[1:2]):.3g} of max |y| {scale:.3g} "
          f"(LoRA effect {max_diff(clean(x[1:2]), y[1:2]):.3g})")
    assert max_diff(got, y[1:2]) < 1e-5 * scale and max_diff(clean(x[1:2]), y[1:2]) > 1e-2

    made = get_peft_model(copy.deepcopy(clean), LoraConfig(
        r=2, lora_alpha=4, target_modules=["k_proj"], init_lora_weights=False,
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    made.save_pretrained(tmp_path / "in")
    shared = funcmem.SharedLoRA.from_peft(copy.deepcopy(clean), tmp_path / "in")
    assert sum(t.kind == "experts" for t in shared.targets) == 4
    with torch.no_grad():
        want, got = made.eval()(x), shared(x)
    print(f"experts, PEFT -> SharedLoRA: max abs diff {max_diff(got, want):.3g} "
          f"(LoRA effect {max_diff(clean(x), want):.3g})")
    assert max_diff(got, want) < 1e-5 * want.abs().max().item() and max_diff(clean(x), want) > 1e-2


def test_what_funcmem_cannot_represent_is_refused(tmp_path):
    torch.manual_seed(4)
    clean = ConvMLP()
    dora = LoraConfig(r=2, target_modules=["fc1"], use_dora=True)
    get_peft_model(copy.deepcopy(clean), dora).save_pretrained(tmp_path / "dora")
    with pytest.raises(NotImplementedError, match=r"use_dora=True \(DoRA"):
        funcmem.SharedLoRA.from_peft(copy.deepcopy(clean), tmp_path / "dora")
    get_peft_model(copy.deepcopy(clean), LoraConfig(r=2, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 4})
                   ).save_pretrained(tmp_path / "ranks")
    with pytest.raises(NotImplementedError, match="rank_pattern"):
        funcmem.SharedLoRA.from_peft(copy.deepcopy(clean), tmp_path / "ranks")
    get_peft_model(copy.deepcopy(clean), LoraConfig(r=2, target_modules=["fc1"])).save_pretrained(tmp_path / "ok")
    narrow = copy.deepcopy(clean)
    narrow.fc1 = nn.Linear(4, 12)
    with pytest.raises(ValueError, match=r"fc1\.lora_B has shape \(16, 2\).*needs \(12, 2\)"):
        funcmem.SharedLoRA.from_peft(narrow, tmp_path / "ok")
    (tmp_path / "ok" / "adapter_model.safetensors").rename(tmp_path / "ok" / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        funcmem.SharedLoRA.from_peft(copy.deepcopy(clean), tmp_path / "ok")
    fm, lora = generated(ConvMLP(dilation=2), ["conv"], torch.randn(1, 2, 10))
    with pytest.raises(NotImplementedError, match=r"conv: PEFT's LoRA on Conv2d ignores dilation"):
        fm.export_peft(lora, 0, tmp_path / "dilated")


def test_hywu_checkpoint_instance_leaves_as_peft(tmp_path, hywu_fixture):
    """The reference HY-WU checkpoint, mounted by its own module paths, exported for one condition."""
    from safetensors.torch import load_file

    torch.manual_seed(5)
    clean = ViT()
    fm = funcmem.hywu.from_pretrained(hywu_fixture, copy.deepcopy(clean))
    condition = load_file(f"{hywu_fixture}/expected.safetensors")["condition"]
    lora = fm.generate(condition)
    x = torch.randn(condition.shape[0], 5, 48)
    with torch.no_grad(), fm.mounted(lora):
        y = fm.base(x)
    fm.export_peft(lora, 1, tmp_path)
    model = PeftModel.from_pretrained(copy.deepcopy(clean), tmp_path).eval()
    with torch.no_grad():
        got = model(x[1:2])
    rel = max_diff(got, y[1:2]) / y[1:2].abs().max().item()
    print(f"HY-WU fixture instance -> PEFT: max abs diff {rel:.3g} of max |y|")
    assert rel < 1e-5 and max_diff(clean(x[1:2]), y[1:2]) > 1e-2 * y[1:2].abs().max().item()
