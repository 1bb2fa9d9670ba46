"""Loaders trust no number in a config.json: sizes are bounded integers, alpha is finite, booleans
are booleans, and the weights a config describes are checked against the safetensors header before
anything is allocated (a config asking for terabytes fails at once)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import funcmem
from funcmem.guard import LoRAGuard, NonFiniteLoRAError
from funcmem.hywu import HywuGenerator, load_generator
from funcmem.lora import LoRA
from funcmem.peft_io import read_peft
from helpers import TinyTransformer

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)
HUGE = 1 << 16  # a width whose generator would need hundreds of GB


def saved_memory(path):
    torch.manual_seed(0)
    funcmem.FunctionalMemory(TinyTransformer(), ["qkv"], rank=4, condition_dim=12, generator=GEN).save_pretrained(path)
    return json.loads((path / "config.json").read_text())


def rewrite(path, config, **changes):
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"rank": 4.9}, r"rank must be an integer, got 4\.9"),
    ({"rank": 0}, r"rank must be between 1 and \d+, got 0"),
    ({"rank": True}, r"rank must be an integer, got True"),
    ({"rank": 10**9}, r"rank must be between 1 and \d+, got 1000000000"),
    ({"alpha": math.nan}, r"alpha must be a finite number, got nan"),
    ({"alpha": math.inf}, r"alpha must be a finite number, got inf"),
    ({"alpha": "4"}, r"alpha must be a finite number, got '4'"),
    ({"condition_dim": -12}, r"condition_dim must be between 1"),
    ({"resolved_targets": {"blocks.0.attn.qkv": ["linear", 16.0, 48, None]}},
     r"resolved_targets\['blocks\.0\.attn\.qkv'\] in must be an integer, got 16\.0"),
    ({"resolved_targets": {"blocks.0.attn.qkv": ["dense", 16, 48, None]}},
     r"resolved_targets\['blocks\.0\.attn\.qkv'\] must be \[kind, in"),
])
def test_functional_memory_config_values_are_refused_by_name(tmp_path, changes, message):
    rewrite(tmp_path, saved_memory(tmp_path), **changes)
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 0, r"generator\.head_dim must be between 1"),
    ("depth", 10_000, r"generator\.depth must be between 1 and 512, got 10000"),
    ("rope_theta", math.nan, r"generator\.rope_theta must be a finite number"),
    ("checkpointing", "false", r"generator\.checkpointing must be true or false, got 'false'"),
])
def test_generator_values_are_refused_by_name(tmp_path, field, value, message):
    config = saved_memory(tmp_path)
    rewrite(tmp_path, config, generator={**config["generator"], field: value})
    with pytest.raises(ValueError, match=message):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())


def test_a_config_asking_for_terabytes_fails_on_the_header_before_allocating(tmp_path):
    config = saved_memory(tmp_path)
    # within every bound, but ~200 GB per block: building it for real would fail inside torch's allocator
    rewrite(tmp_path, config, generator={**config["generator"], "d_model": HUGE, "head_dim": 64, "depth": 8})
    with pytest.raises(ValueError, match=r"model\.safetensors does not fit the model its config\.json describes.*"
                                         r"hidden_in\.weight: \(32, 12\) in the file, \(65536, 12\) in the model"):
        funcmem.FunctionalMemory.from_pretrained(tmp_path, TinyTransformer())


def test_bank_and_shared_lora_configs_are_checked_before_allocating(tmp_path):
    base = TinyTransformer()
    funcmem.LoRABank(base, ["qkv"], rank=2, num=3).save_pretrained(tmp_path / "bank")
    config = json.loads((tmp_path / "bank" / "config.json").read_text())
    rewrite(tmp_path / "bank", config, num=1 << 20)  # 4 GB of factors the 3-adapter file does not hold
    with pytest.raises(ValueError, match=r"does not fit .*\(3, 2, 16\) in the file, \(1048576, 2, 16\) in the model"):
        funcmem.LoRABank.from_pretrained(tmp_path / "bank", TinyTransformer())
    rewrite(tmp_path / "bank", config, num=2.5)
    with pytest.raises(ValueError, match=r"num must be an integer, got 2\.5"):
        funcmem.LoRABank.from_pretrained(tmp_path / "bank", TinyTransformer())
    funcmem.SharedLoRA(TinyTransformer(), ["qkv"], rank=2).save_pretrained(tmp_path / "shared")
    config = json.loads((tmp_path / "shared" / "config.json").read_text())
    rewrite(tmp_path / "shared", config, rank=HUGE)
    with pytest.raises(ValueError, match=r"does not fit .*\(1, 2, 16\) in the file, \(1, 65536, 16\) in the model"):
        funcmem.SharedLoRA.from_pretrained(tmp_path / "shared", TinyTransformer())


def test_constructors_refuse_fractional_ranks_and_non_finite_alpha():
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 4\.9"):
        funcmem.SharedLoRA(TinyTransformer(), ["qkv"], rank=4.9)
    with pytest.raises(ValueError, match="alpha must be finite, got nan"):
        funcmem.SharedLoRA(TinyTransformer(), ["qkv"], rank=4, alpha=math.nan)


# ---------------------------------------------------------------- HY-WU checkpoints


def hywu_config(**changes):
    config = {"model_type": "parameter_generator", "token_dim": 16, "rank": 4, "alpha": 4, "input_dim": 10,
              "d_model": 32, "head_dim": 8, "dim_accumulation": 1, "num_base_model_layers": 2, "output_dim": 16,
              "num_pg_layers": 1, "prefix": "blocks.", "pg_mapping": {"fc": {"lora_A_dim": 24, "lora_B_dim": 24}}}
    return {**config, **changes}


def write_hywu(path, config, state):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize("changes, message", [
    ({"rank": 0}, r"rank must be between 1"),  # was a ZeroDivisionError
    ({"head_dim": 0}, r"head_dim must be between 1"),  # was a ZeroDivisionError
    ({"rank": 4.9}, r"rank must be an integer, got 4\.9"),  # was truncated to 4
    ({"rank": 10**9}, r"rank must be between 1 and \d+, got 1000000000"),  # was 2.7 TB
    ({"num_pg_layers": 10_000}, r"num_pg_layers must be between 1 and 512"),  # was 3.7 GB
    ({"alpha": math.nan}, r"alpha must be a finite number, got nan"),  # was NaN outputs
    ({"alpha": -math.inf}, r"alpha must be a finite number, got -inf"),
    ({"pg_mapping": {"fc": {"lora_A_dim": 24.5, "lora_B_dim": 24}}}, r"pg_mapping\['fc'\]\.lora_A_dim must be an int"),
])
def test_hywu_config_values_are_refused_by_name(tmp_path, changes, message):
    write_hywu(tmp_path, hywu_config(**changes), HywuGenerator(hywu_config()).generator.state_dict())
    with pytest.raises(ValueError, match=r"HY-WU config\.json: " + message):
        load_generator(tmp_path)


def test_hywu_load_checks_the_header_before_allocating(tmp_path):
    write_hywu(tmp_path, hywu_config(d_model=HUGE, num_pg_layers=8, head_dim=64),
               HywuGenerator(hywu_config()).generator.state_dict())
    with pytest.raises(ValueError, match=r"(?s)HY-WU weights do not fit their config\.json.*hidden_in\.weight: "
                                         r"checkpoint \(32, 10\) vs config \(65536, 10\)"):
        load_generator(tmp_path)


# ---------------------------------------------------------------- PEFT adapters and the guard


def peft_adapter(path):
    torch.manual_seed(0)
    shared = funcmem.SharedLoRA(TinyTransformer(), ["qkv"], rank=4, alpha=8)
    shared.export_peft(path)
    return json.loads((path / "adapter_config.json").read_text())


@pytest.mark.parametrize("changes, message", [
    ({"r": 4.9}, r"r must be an integer, got 4\.9"),
    ({"r": "4"}, r"r must be an integer, got '4'"),
    ({"lora_alpha": math.nan}, r"lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": math.inf}, r"lora_alpha must be a finite number, got inf"),
    ({"use_rslora": "false"}, r"use_rslora must be true or false, got 'false'"),
])
def test_peft_config_values_are_refused_by_name(tmp_path, changes, message):
    config = peft_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    with pytest.raises(ValueError, match=message):
        read_peft(tmp_path, TinyTransformer())


def test_peft_weights_with_nan_are_refused(tmp_path):
    peft_adapter(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = sorted(state)[0]
    state[key][0, 0] = math.nan
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} holds NaN or Inf values"):
        funcmem.SharedLoRA.from_peft(TinyTransformer(), tmp_path)


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_the_guard_refuses_a_non_finite_scale(scale):
    lora = LoRA({"fc": (torch.ones(1, 2, 4), torch.ones(1, 4, 2))}, scale)
    guard = LoRAGuard()
    with pytest.raises(NonFiniteLoRAError, match=rf"scale \(alpha / rank\) is {scale}"):
        guard(lora)
    assert guard.nonfinite == 1
