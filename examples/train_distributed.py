"""Training a generator over several processes with the same ``Trainer`` (DDP or FSDP).

The toy conflicting-tasks problem (``funcmem.toy``). ``batch_fn(step)`` returns the global batch;
each process trains on its shard, gradients are averaged, rank 0 writes checkpoints holding full
(unsharded) tensors, so a run resumes on any number of processes.

    python examples/train_distributed.py                                   # 1 process
    torchrun --nproc_per_node 2 examples/train_distributed.py              # DDP, gloo on CPU / NCCL on GPU
    torchrun --nproc_per_node 2 examples/train_distributed.py --fsdp       # generator sharded (FSDP2)
    # two machines x 8 GPUs (run on each, node_rank 0 and 1):
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST0 --master_port 29500 \\
        examples/train_distributed.py --fsdp
"""

from __future__ import annotations

import argparse

import torch

import funcmem
from funcmem import distributed
from funcmem.toy import ConflictingTasks, ToyMLP
from funcmem.train import Trainer, TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsdp", action="store_true", help="shard the generator (FSDP2) instead of replicating it")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32, help="global batch, divisible by the process count")
    parser.add_argument("--out", default="runs/examples/distributed")
    args = parser.parse_args()

    distributed.init_from_env()  # no-op for a single process; Trainer would also do it
    dev = distributed.device()  # cuda:LOCAL_RANK with CUDA, else CPU
    torch.manual_seed(0)  # every rank builds the same model (rank 0's weights are broadcast anyway)
    base = ToyMLP(dim=32)
    tasks = ConflictingTasks(base, num_pairs=2, cond_dim=16)
    fm = funcmem.FunctionalMemory(base, targets=["blocks.*.fc1"], rank=4, condition_dim=16,
                                  generator=funcmem.GeneratorConfig(d_model=64, depth=2, head_dim=16)).to(dev)

    def loss_fn(m, batch):
        cond, x, y, _ = (t.to(dev) for t in batch)
        return ((m(cond, x) - y) ** 2).mean()

    cfg = TrainConfig(steps=args.steps, lr=2e-3, warmup_steps=20, out_dir=args.out, checkpoint_every=50,
                      log_every=25, distributed="fsdp" if args.fsdp else "auto")
    trainer = Trainer(fm, loss_fn, cfg)
    history = trainer.fit(lambda step: tasks.batch(step, args.batch), resume=True)
    if distributed.is_main():
        print(f"{trainer.mode} x {distributed.world_size()} process(es): loss {history[0]['loss']:.4f} "
              f"(step {history[0]['step']}) -> {history[-1]['loss']:.4f} (step {history[-1]['step']})")
    distributed.cleanup()


if __name__ == "__main__":
    main()
