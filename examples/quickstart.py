"""Quickstart: a generator of per-instance LoRA against one shared LoRA on a conflicting toy problem.

The README's quickstart, as a file (tests/test_readme.py keeps the two the same). The core install
alone runs it (``pip install -e .``), in about 10 s of CPU time::

    python examples/quickstart.py
"""

import torch

import funcmem

torch.manual_seed(0)
base = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 16))  # any nn.Module
cond = torch.randn(4, 1, 8)                                # task k's condition: (L=1, condition_dim=8)
delta = torch.randn(2, 16, 2) @ torch.randn(2, 2, 64) / 4  # task k wants the last layer's weight + delta[k],
delta = torch.cat([delta, -delta])                         # in opposite pairs: no single LoRA serves all four

def batch(step, n=64):                                     # (condition, input, target) of n random tasks
    k, x = torch.randint(4, (n,)), torch.randn(n, 16)
    with torch.no_grad():
        return cond[k], x, base(x) + (delta[k] @ torch.tanh(base[0](x))[..., None])[..., 0]

fm = funcmem.FunctionalMemory(base, targets=["2"], rank=4, condition_dim=8,  # "2": the last Linear's name
                              generator=funcmem.GeneratorConfig(d_model=32, depth=1, head_dim=16))
shared = funcmem.SharedLoRA(base, targets=["2"], rank=4)   # the baseline: one static LoRA for every task
mse = lambda y, t: ((y - t) ** 2).mean()
fit = lambda model, loss, lr: funcmem.train.Trainer(
    model, loss, funcmem.train.TrainConfig(steps=300, lr=lr, progress=False)).fit(batch)
fit(fm, lambda m, b: mse(m(b[0], b[1]), b[2]), 3e-3)       # fm(condition, x): generate, mount, run the base
fit(shared, lambda m, b: mse(m(b[1]), b[2]), 1e-2)
c, x, y = batch(None, 1024)
with torch.no_grad():
    print(f"test MSE: frozen base {mse(base(x), y):.3f}, shared LoRA {mse(shared(x), y):.3f}, "
          f"generator {mse(fm(c, x), y):.3f}")
