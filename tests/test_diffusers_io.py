"""diffusers LoRA files: one generated instance (or a SharedLoRA, or one LoRA of a bank) exported with
``export_diffusers`` and loaded by diffusers itself, through a model's ``load_lora_adapter`` and a
pipeline's ``load_lora_weights``, gives the output funcmem's ``mounted(lora[i])`` gives, scale included."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import funcmem
from funcmem.diffusers_io import METADATA_KEY, WEIGHTS_NAME
from helpers import build, random_lora, tiny_sd3

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers loads LoRA through PEFT

# the joint attention's projections (Linear) and the patch embedding (a 2x2 stride-2 Conv2d)
TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
           "pos_embed.proj"]
RANK, ALPHA = 4, 12  # scale 3: a lost alpha / r would show


def inputs(b: int):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(b, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(b, 5, 16, generator=g),
                pooled_projections=torch.randn(b, 8, generator=g), timestep=torch.tensor([300.0, 700.0][:b]))


@torch.no_grad()
def run(transformer, b: int = 2) -> torch.Tensor:
    return transformer(**inputs(b)).sample


def pipeline(transformer) -> diffusers.StableDiffusion3Pipeline:
    """An SD3 pipeline around ``transformer`` alone (no text encoders or VAE: LoRA loading needs none)."""
    none = dict.fromkeys(["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                          "tokenizer_3"])
    return diffusers.StableDiffusion3Pipeline(transformer=transformer,
                                              scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), **none)


@pytest.fixture(scope="module")
def generated():
    """(clean SD3 copy, FunctionalMemory on another copy, its LoRA for 2 prompts, mounted outputs)."""
    clean = tiny_sd3()
    fm = funcmem.FunctionalMemory(copy.deepcopy(clean), TARGETS, rank=RANK, alpha=ALPHA, condition_dim=16,
                                  generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16))
    torch.manual_seed(2)
    with torch.no_grad():
        fm.generator.model.proj_out_B.weight.normal_(std=0.01)
        lora = fm.generate(torch.randn(2, 5, 16))
        assert fm.guard.clipped == 0
        with fm.mounted(lora):
            mounted = run(fm.base)
    assert (mounted - run(clean)).abs().max() > 1e-2  # the LoRA changes the output
    return clean, fm, lora, mounted


@pytest.mark.parametrize("i", [0, 1])
def test_an_exported_instance_loads_with_load_lora_adapter(generated, tmp_path, i):
    clean, fm, lora, mounted = generated
    fm.export_diffusers(lora, i, tmp_path)
    transformer = copy.deepcopy(clean)
    transformer.load_lora_adapter(tmp_path, prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(run(transformer)[i], mounted[i], rtol=0, atol=1e-5)


def test_an_exported_instance_loads_with_a_pipelines_load_lora_weights(generated, tmp_path):
    clean, fm, lora, mounted = generated
    fm.export_diffusers(lora, 1, tmp_path)
    pipe = pipeline(copy.deepcopy(clean))
    pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(run(pipe.transformer)[1], mounted[1], rtol=0, atol=1e-5)


def test_the_file_has_diffusers_names_and_needs_no_metadata(generated, tmp_path):
    """Keys ``transformer.{module}.lora_A/B.weight``; the scale is in the factors, so a reader that
    ignores the metadata (diffusers before 0.34, other tools) gets the same update."""
    clean, fm, lora, mounted = generated
    fm.export_diffusers(lora, 0, tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in state
    assert len(state) == 2 * len(fm.targets) and all(k.startswith("transformer.") for k in state)
    with safe_open(tmp_path / WEIGHTS_NAME, "pt") as f:
        assert METADATA_KEY in f.metadata()
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file(state, bare / WEIGHTS_NAME)
    transformer = copy.deepcopy(clean)
    transformer.load_lora_adapter(bare, prefix="transformer", use_safetensors=True)
    torch.testing.assert_close(run(transformer)[0], mounted[0], rtol=0, atol=1e-5)


def test_a_shared_lora_and_a_bank_entry_export_the_same_way(tmp_path):
    clean = tiny_sd3()
    bank = funcmem.LoRABank(copy.deepcopy(clean), TARGETS, rank=RANK, alpha=ALPHA, num=3)
    shared = funcmem.SharedLoRA(copy.deepcopy(clean), TARGETS, rank=RANK, alpha=ALPHA)
    torch.manual_seed(3)
    with torch.no_grad():
        for module in (bank, shared):
            for p in module.lora_B.values():
                p.normal_(std=0.05)
    for name, module, export, index in (("bank", bank, lambda d: bank.export_diffusers(1, d), torch.tensor([1])),
                                        ("shared", shared, shared.export_diffusers, None)):
        export(tmp_path / name)
        with torch.no_grad(), module.mounted(module.lora() if index is None else module.lora(index)):
            want = run(module.base, 1)
        transformer = copy.deepcopy(clean)
        transformer.load_lora_adapter(tmp_path / name, prefix="transformer", use_safetensors=True)
        assert (want - run(clean, 1)).abs().max() > 1e-2
        torch.testing.assert_close(run(transformer, 1), want, rtol=0, atol=1e-5)


def test_stacked_experts_are_refused_by_name(tmp_path):
    _, fm, _ = build("experts")
    with pytest.raises(NotImplementedError, match="experts.gate_up"):
        fm.export_diffusers(random_lora(fm, 1), 0, tmp_path)
