"""Functional memory on Hugging Face architectures built from tiny configs (random weights, no hub).

- ``transformers`` decoders: Llama (LoRA on attention and MLP projections) and Qwen3-MoE (LoRA on
  attention and on the fused 3-D expert weights ``experts.gate_up_proj`` / ``experts.down_proj``);
  the condition is an instruction's token embeddings.
- ``diffusers`` SD3 MMDiT transformer: LoRA on the joint attention's projections, generated once per
  request and reused over the denoising steps of a small Euler sampler with CFG copies.

For each: per-sample mounted outputs equal per-sample merged outputs, one training step moves only
the generator, and ``save_pretrained`` / ``from_pretrained`` round-trip.
"""

from __future__ import annotations

import pytest
import torch

import funcmem
from funcmem.train import Trainer, TrainConfig
from helpers import tiny_sd3

transformers = pytest.importorskip("transformers")

GEN = funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16)
VOCAB = 64


def wake(fm: funcmem.FunctionalMemory, std: float = 0.02) -> None:
    """Give the generator's B head (zero at init, so the LoRA would be zero) random weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in fm.generator.model.proj_out_B.parameters():
            p.normal_(0, std)


def base_state(fm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fm.base.state_dict().items()}


def check_one_step(fm, trainer, batch, before_base, before_gen) -> None:
    """Only generator weights are trainable and move; the base is bit-identical after each step.
    At init the B head is zero, so step 1 moves only it; step 2 moves the rest of the generator."""
    assert set(trainer.names.values()) == {f"generator.{k}" for k, _ in fm.generator.named_parameters()}
    for step in (1, 2):
        assert trainer.train_step(batch)["grad_norm"] > 0
        for k, v in fm.base.state_dict().items():
            assert torch.equal(v, before_base[k]), k
        moved = {k for k, v in fm.generator.state_dict().items() if not torch.equal(v, before_gen[k])}
        if step == 1:
            assert moved == {"model.proj_out_B.weight", "model.proj_out_B.bias"}
        else:
            assert len(moved) >= len(before_gen) - 2, set(before_gen) - moved  # nearly all move by step 2


# ------------------------------------------------------------------------------ transformers decoders


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]


def qwen3_moe():
    cfg = transformers.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
    return transformers.Qwen3MoeForCausalLM(cfg), ["q_proj", "v_proj", "o_proj", "experts"]


DECODERS = {"llama": llama, "qwen3_moe": qwen3_moe}


def decoder_fm(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model, targets = DECODERS[arch]()
    model.eval()
    fm = funcmem.FunctionalMemory(model, targets=targets, rank=4, alpha=8, condition_dim=model.config.hidden_size,
                                  generator=GEN)
    return fm


def instruction(fm, ids: torch.Tensor) -> torch.Tensor:
    """Condition (B, L, hidden): the frozen base's embeddings of instruction tokens (B, L)."""
    return fm.base.get_input_embeddings()(ids).detach()


def lm_loss(fm, batch):
    """Next-token loss of the base with the LoRA generated from the instruction."""
    instr, ids = batch
    return fm(instruction(fm, instr), input_ids=ids, labels=ids).loss


def decoder_batch(seed: int = 0, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (b, 5), generator=g), torch.randint(VOCAB, (b, 7), generator=g)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_decoder_targets_resolve_to_linear_and_fused_experts(arch):
    fm = decoder_fm(arch)
    kinds = {t.slot: t.kind for t in fm.targets}
    if arch == "qwen3_moe":  # fused (E, out, in) expert weights, LoRA per expert
        assert kinds["mlp.experts.gate_up_proj"] == kinds["mlp.experts.down_proj"] == "experts"
        gate_up = next(t for t in fm.targets if t.slot == "mlp.experts.gate_up_proj")
        assert (gate_up.num_experts, gate_up.out_features, gate_up.in_features) == (4, 32, 32)
    else:
        assert set(kinds.values()) == {"linear"} and len(fm.targets) == 2 * 7
    assert {t.layer for t in fm.targets} == {"model.layers.0", "model.layers.1"}


@pytest.mark.parametrize("arch", list(DECODERS))
def test_decoder_mounted_batch_equals_each_sample_merged(arch):
    """One batched forward with 3 different LoRAs == each sample alone with its LoRA merged."""
    fm = decoder_fm(arch)
    wake(fm)
    instr, ids = decoder_batch()
    with torch.no_grad():
        lora = fm.generate(instruction(fm, instr))
        assert (lora[0].flatten() - lora[1].flatten()).abs().max() > 1e-3  # each sample its own LoRA
        plain = fm.base(ids).logits
        with fm.mounted(lora):
            mounted = fm.base(ids).logits
        assert (mounted - plain).abs().max() > 1e-2  # the LoRA changes the output
        for i in range(len(ids)):
            fm.merge(lora[i])
            merged = fm.base(ids[i:i + 1]).logits
            fm.unmerge()
            torch.testing.assert_close(mounted[i:i + 1], merged, rtol=0, atol=1e-5)
        torch.testing.assert_close(fm.base(ids).logits, plain, rtol=0, atol=0)  # unmerge restores exactly


@pytest.mark.parametrize("arch", list(DECODERS))
def test_decoder_training_step_moves_only_the_generator(arch, tmp_path):
    fm = decoder_fm(arch)
    before_base = base_state(fm)
    before_gen = {k: v.clone() for k, v in fm.generator.state_dict().items()}
    trainer = Trainer(fm, lm_loss, TrainConfig(steps=2, lr=1e-2, warmup_steps=1, progress=False, distributed="none"))
    check_one_step(fm, trainer, decoder_batch(), before_base, before_gen)


@pytest.mark.parametrize("arch", list(DECODERS))
def test_decoder_save_pretrained_round_trip(arch, tmp_path):
    fm = decoder_fm(arch)
    wake(fm)
    fm.save_pretrained(tmp_path / "gen")
    torch.manual_seed(0)
    fresh_model, _ = DECODERS[arch]()
    fresh_model.load_state_dict(base_state(fm))  # the same frozen base (wrappers save plain HF names)
    loaded = funcmem.FunctionalMemory.from_pretrained(tmp_path / "gen", fresh_model.eval())
    instr, ids = decoder_batch(1)
    with torch.no_grad():
        a = fm(instruction(fm, instr), ids).logits
        b = loaded(instruction(loaded, instr), ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------ diffusers MMDiT


def sd3(seed: int = 0):
    """A 2-block SD3 MMDiT: latents (b, 4, 8, 8), prompt (b, L, 16), pooled (b, 8)."""
    pytest.importorskip("diffusers")
    return tiny_sd3(seed)


def sd3_fm(seed: int = 0):
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    return funcmem.FunctionalMemory(sd3(seed), targets=targets, rank=4, alpha=8, condition_dim=16, generator=GEN)


def requests(b: int = 2, seed: int = 0):
    """b requests: latent noise (b, 4, 8, 8), prompt embeddings (b, 5, 16), pooled (b, 8)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 5, 16, generator=g), torch.randn(b, 8, generator=g)


def euler_cfg(transformer, noise, prompt, pooled, steps: int = 3, guidance: float = 3.0):
    """A flow-matching Euler sampler with classifier-free guidance: every step runs the batch
    [cond requests; uncond requests] (2b) through ``transformer`` (whatever LoRA is mounted)."""
    x = noise
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    null_prompt, null_pooled = torch.zeros_like(prompt), torch.zeros_like(pooled)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        v = transformer(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([prompt, null_prompt]),
                        pooled_projections=torch.cat([pooled, null_pooled]),
                        timestep=torch.full((2 * len(x),), 1000 * s.item())).sample
        cond, uncond = v.chunk(2)
        x = x + (s_next - s) * (uncond + guidance * (cond - uncond))
    return x


def test_mmdit_lora_generated_once_per_request_matches_each_request_merged():
    """A batch of 2 requests (each with its own LoRA, generated once and kept for 3 CFG steps;
    cond and uncond copies share it: LoRA batch 2, input batch 4) == each request sampled alone
    with its LoRA merged into the weights."""
    fm = sd3_fm()
    wake(fm)
    calls = []
    fm.generator.register_forward_hook(lambda *args: calls.append(1))
    noise, prompt, pooled = requests()
    with torch.no_grad():
        lora = fm.generate(prompt)  # once per request
        with fm.mounted(lora):
            batched = euler_cfg(fm.base, noise, prompt, pooled)
        assert len(calls) == 1
        plain = euler_cfg(fm.base, noise, prompt, pooled)
        assert (batched - plain).abs().max() > 1e-2
        for i in range(2):
            fm.merge(lora[i])
            alone = euler_cfg(fm.base, noise[i:i + 1], prompt[i:i + 1], pooled[i:i + 1])
            fm.unmerge()
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-5)


def flow_loss(fm, batch):
    """Rectified-flow loss: predict noise - x0 at x_t = (1 - t) x0 + t noise."""
    x0, noise, prompt, pooled, t = batch
    xt = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    v = fm(prompt, hidden_states=xt, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=1000 * t).sample
    return ((v - (noise - x0)) ** 2).mean()


def test_mmdit_training_step_moves_only_the_generator():
    fm = sd3_fm()
    before_base = base_state(fm)
    before_gen = {k: v.clone() for k, v in fm.generator.state_dict().items()}
    noise, prompt, pooled = requests()
    batch = (torch.randn_like(noise), noise, prompt, pooled, torch.tensor([0.3, 0.8]))
    trainer = Trainer(fm, flow_loss, TrainConfig(steps=2, lr=1e-2, warmup_steps=1, progress=False, distributed="none"))
    check_one_step(fm, trainer, batch, before_base, before_gen)


def test_mmdit_save_pretrained_round_trip(tmp_path):
    fm = sd3_fm()
    wake(fm)
    fm.save_pretrained(tmp_path / "gen")
    loaded = funcmem.FunctionalMemory.from_pretrained(tmp_path / "gen", sd3())  # same seed: same base
    noise, prompt, pooled = requests(seed=3)
    with torch.no_grad():
        with fm.mounted(fm.generate(prompt)):
            a = euler_cfg(fm.base, noise, prompt, pooled)
        with loaded.mounted(loaded.generate(prompt)):
            b = euler_cfg(loaded.base, noise, prompt, pooled)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
