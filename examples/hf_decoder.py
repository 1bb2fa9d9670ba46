"""Functional memory on a Hugging Face decoder: an instruction writes a LoRA for the LLM.

A tiny Llama (or Qwen3-MoE, whose fused expert weights take LoRA per expert) is built from its
config with random weights; with a real checkpoint, replace ``build`` by
``AutoModelForCausalLM.from_pretrained(name)``. The task: after a random prompt, instruction k asks
the model to answer with its word ``ANSWERS[k]`` repeated; one frozen base, one generator, a
different LoRA for every instruction (a single shared LoRA could only hedge between the answers).

    python examples/hf_decoder.py --arch llama --steps 60
    python examples/hf_decoder.py --arch qwen3_moe
    torchrun --nproc_per_node 2 examples/hf_decoder.py      # DDP over 2 processes, same curve
"""

from __future__ import annotations

import argparse

import torch
import transformers

import funcmem
from funcmem import distributed
from funcmem.train import Trainer, TrainConfig

VOCAB, ANSWERS, PROMPT, ANSWER = 64, (3, 17, 42, 58), 6, 6


def build(arch: str) -> tuple[torch.nn.Module, list[str]]:
    """A 2-layer decoder from its config and the modules that take LoRA."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(intermediate_size=128, **common))
        return model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = transformers.Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, **common)
    # "experts" names the module holding the (E, out, in) gate_up_proj / down_proj: LoRA per expert
    return transformers.Qwen3MoeForCausalLM(config), ["q_proj", "v_proj", "o_proj", "experts"]


def make_batch(step: int, size: int = 16, seed: int = 0):
    """(instruction ids (B, 4), sequence ids (B, 12), labels (B, 12)): a random prompt of 6 tokens,
    then instruction k's answer token ``ANSWERS[k]`` 6 times; only the answer is scored."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    task = torch.randint(len(ANSWERS), (size,), generator=g)
    instructions = torch.stack([torch.arange(4) + 8 * k for k in task.tolist()])  # 4 fixed tokens per task
    answer = torch.tensor(ANSWERS)[task][:, None].expand(size, ANSWER)
    ids = torch.cat([torch.randint(VOCAB, (size, PROMPT), generator=g), answer], dim=1)
    labels = torch.cat([torch.full((size, PROMPT), -100), answer], dim=1)
    return instructions, ids, labels


def condition(fm: funcmem.FunctionalMemory, instructions: torch.Tensor) -> torch.Tensor:
    """(B, 4) ids -> (B, 4, hidden): the frozen base's own token embeddings of the instruction."""
    return fm.base.get_input_embeddings()(instructions).detach()


def loss_fn(fm, batch):
    instructions, ids, labels = batch
    return fm(condition(fm, instructions), input_ids=ids, labels=labels).loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=["llama", "qwen3_moe"], default="llama")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=16, help="global batch (split over processes)")
    parser.add_argument("--out", default="runs/examples/hf_decoder")
    args = parser.parse_args()

    torch.manual_seed(0)
    base, targets = build(args.arch)
    fm = funcmem.FunctionalMemory(base, targets=targets, rank=4, alpha=8, condition_dim=base.config.hidden_size,
                                  generator=funcmem.GeneratorConfig(d_model=64, depth=2, head_dim=16, token_dim=32))
    if distributed.is_main():
        print(f"{args.arch}: {len(fm.targets)} targets, generator {fm.num_trainable_parameters():,} parameters")
    instructions, ids, labels = make_batch(10_000, size=8)  # held out
    with torch.no_grad():
        before = fm.base(ids, labels=labels).loss.item()

    trainer = Trainer(fm, loss_fn, TrainConfig(steps=args.steps, lr=5e-3, warmup_steps=5, out_dir=args.out,
                                               checkpoint_every=20, log_every=10, distributed="auto"))
    trainer.fit(lambda step: make_batch(step, args.batch), resume=True)

    fm.eval()
    with torch.no_grad():
        lora = fm.generate(condition(fm, instructions))  # one LoRA per instruction
        with fm.mounted(lora):
            after = fm.base(ids, labels=labels).loss.item()
            mounted = fm.base(ids).logits
        fm.merge(lora[0])  # one instance alone, LoRA folded into the weights
        merged = fm.base(ids[:1]).logits
        fm.unmerge()
    if distributed.is_main():
        print(f"held-out answer loss: frozen base {before:.3f} -> with generated LoRA {after:.3f}")
        print(f"mounted vs merged, sample 0: max |diff| = {(mounted[:1] - merged).abs().max().item():.1e}")
        fm.save_pretrained(f"{args.out}/generator")
        torch.manual_seed(0)
        fresh, _ = build(args.arch)
        fresh.load_state_dict(fm.base.state_dict())  # stands for loading the same base checkpoint
        loaded = funcmem.FunctionalMemory.from_pretrained(f"{args.out}/generator", fresh.eval())
        with torch.no_grad():
            same = torch.equal(loaded(condition(loaded, instructions), ids).logits,
                               fm(condition(fm, instructions), ids).logits)
        print(f"saved to {args.out}/generator; reloaded outputs identical: {same}")
    distributed.cleanup()


if __name__ == "__main__":
    main()
