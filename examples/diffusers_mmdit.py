"""Functional memory on a diffusers MMDiT (SD3 transformer): a prompt writes a LoRA for the sampler.

A tiny ``SD3Transformer2DModel`` is built from its config with random weights (with a real model:
``SD3Transformer2DModel.from_pretrained(name, subfolder="transformer")``). LoRA goes on the joint
attention's projections (image stream ``to_q/k/v``, text stream ``add_q/k/v_proj``). The task:
prompt k's images are latents of a fixed per-prompt colour (plus noise); the generator is trained
with the rectified-flow loss through the frozen transformer.

Sampling follows how a pipeline uses functional memory: the LoRA is generated **once per
request** and stays mounted for every denoising step; classifier-free guidance runs the batch
``[cond; uncond]`` (2b samples) with a LoRA batch of b, so copy i uses LoRA ``i % b``.

    python examples/diffusers_mmdit.py --steps 80
    torchrun --nproc_per_node 2 examples/diffusers_mmdit.py   # DDP over 2 processes
"""

from __future__ import annotations

import argparse

import torch
from diffusers import SD3Transformer2DModel

import funcmem
from funcmem import distributed
from funcmem.train import Trainer, TrainConfig

PROMPTS, PROMPT_LEN, TEXT_DIM, POOLED_DIM = 4, 6, 32, 16


def build() -> SD3Transformer2DModel:
    """Latents (b, 4, 8, 8), prompt embeddings (b, L, 32), pooled (b, 16); 2 joint blocks."""
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=32, pooled_projection_dim=POOLED_DIM,
                                 pos_embed_max_size=16).eval()


class Prompts:
    """Fixed random 'text encoder' outputs per prompt and the latent colour each prompt asks for."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.embeddings = torch.randn(PROMPTS, PROMPT_LEN, TEXT_DIM, generator=g)
        self.pooled = torch.randn(PROMPTS, POOLED_DIM, generator=g)
        self.colours = torch.randn(PROMPTS, 4, generator=g)

    def batch(self, step: int, size: int = 16):
        """(x0 (B, 4, 8, 8), noise, prompt (B, L, 32), pooled (B, 16), t (B,))."""
        g = torch.Generator().manual_seed(1_000_003 + step)
        k = torch.randint(PROMPTS, (size,), generator=g)
        x0 = self.colours[k][:, :, None, None] + 0.1 * torch.randn(size, 4, 8, 8, generator=g)
        return x0, torch.randn(size, 4, 8, 8, generator=g), self.embeddings[k], self.pooled[k], torch.rand(size, generator=g)


def flow_loss(fm, batch):
    """Rectified flow: at x_t = (1 - t) x0 + t noise the transformer predicts noise - x0."""
    x0, noise, prompt, pooled, t = batch
    tt = t[:, None, None, None]
    v = fm(prompt, hidden_states=(1 - tt) * x0 + tt * noise, encoder_hidden_states=prompt,
           pooled_projections=pooled, timestep=1000 * t).sample
    return ((v - (noise - x0)) ** 2).mean()


@torch.no_grad()
def sample(fm: funcmem.FunctionalMemory, prompt, pooled, steps: int = 8, guidance: float = 2.0, seed: int = 0):
    """Euler sampler with CFG. The LoRA is generated once and reused for all ``steps``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(prompt), 4, 8, 8, generator=g)
    lora = fm.generate(prompt)  # (b requests) -- once per request
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with fm.mounted(lora):  # input batch 2b: copy i uses LoRA i % b
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            v = fm.base(hidden_states=torch.cat([x, x]), encoder_hidden_states=torch.cat([prompt, 0 * prompt]),
                        pooled_projections=torch.cat([pooled, 0 * pooled]),
                        timestep=torch.full((2 * len(x),), 1000 * s.item())).sample
            cond, uncond = v.chunk(2)
            x = x + (s_next - s) * (uncond + guidance * (cond - uncond))
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over processes)")
    parser.add_argument("--out", default="runs/examples/diffusers_mmdit")
    args = parser.parse_args()

    torch.manual_seed(0)
    base, prompts = build(), Prompts()
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    fm = funcmem.FunctionalMemory(base, targets=targets, rank=4, alpha=8, condition_dim=TEXT_DIM,
                                  generator=funcmem.GeneratorConfig(d_model=64, depth=2, head_dim=16, token_dim=32))
    trainer = Trainer(fm, flow_loss, TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=5, out_dir=args.out,
                                                 checkpoint_every=20, log_every=10, distributed="auto"))
    history = trainer.fit(lambda step: prompts.batch(step, args.batch), resume=True)

    fm.eval()
    out = sample(fm, prompts.embeddings, prompts.pooled)  # all prompts in one batch
    if distributed.is_main():
        print(f"flow loss: step {history[0]['step']} {history[0]['loss']:.3f} -> step {history[-1]['step']} "
              f"{history[-1]['loss']:.3f}")
        error = (out.mean((2, 3)) - prompts.colours).abs().mean().item()
        print(f"mean |sampled colour - prompt colour| = {error:.3f} (the colours have std 1)")
        fm.save_pretrained(f"{args.out}/generator")
        torch.manual_seed(0)
        fresh = build()
        fresh.load_state_dict(fm.base.state_dict())  # stands for loading the same base checkpoint
        loaded = funcmem.FunctionalMemory.from_pretrained(f"{args.out}/generator", fresh)
        same = torch.equal(sample(loaded, prompts.embeddings, prompts.pooled), out)
        print(f"saved to {args.out}/generator; reloaded sampler output identical: {same}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
