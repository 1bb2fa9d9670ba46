"""LoRA on ``nn.Conv2d`` as PEFT does it: A a conv with the base kernel, B a 1x1 conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import WeightedLoRALayer


class Conv2dLoRA(WeightedLoRALayer):
    """LoRA on ``nn.Conv2d`` as PEFT does it: A a conv with the base kernel, B a 1x1 conv.

    Input (b, C, H, W). Per sample, A (n, r, C*kh*kw) is used as conv weights (n*r, C, kh, kw) in
    one grouped convolution over the samples' channel blocks; B is a batched matmul into the output.
    """

    def weight_delta(self, name, a, b, scale):
        conv = self.base_layer
        return scale * (b @ a).view(conv.out_channels, conv.in_channels, *conv.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if "weight" not in self.factors:
            return y
        if x.dim() != 4:
            raise ValueError(f"Conv2d LoRA needs a batched input (b, C, H, W), got {tuple(x.shape)}")
        return self._add_lora(x, y, self.factors["weight"])

    def _conv_a(self, x: Tensor, a: Tensor, groups: int) -> Tensor:
        """x (k, groups*C, H, W) through A as conv weights (groups*r, C, kh, kw) -> (k, groups*r, H', W')."""
        conv = self.base_layer
        w = a.reshape(-1, conv.in_channels, *conv.kernel_size)
        return F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, groups=groups)

    def _plain(self, x, y, a, b, scale, inplace):
        h = self._conv_a(x, a, 1).flatten(2)  # (b, r, H'W')
        bb = b.expand(x.shape[0], -1, -1)
        if inplace:
            y.view(*y.shape[:2], -1).baddbmm_(bb, h, alpha=scale)
            return y
        return torch.baddbmm(y.reshape(*y.shape[:2], -1), bb, h, alpha=scale).view(y.shape)

    def _per_sample(self, x, y, a, b, scale, inplace):
        (n, r), k = a.shape[:2], x.shape[0] // a.shape[0]
        h = self._conv_a(x.reshape(k, -1, *x.shape[2:]), a, n).view(k, n, r, -1)  # (k, n, r, H'W')
        y4 = y.view(k, n, y.shape[1], -1) if inplace else y.reshape(k, n, y.shape[1], -1)
        if inplace:  # CFG copies (k > 1) share the factors
            for c in range(k):
                y4[c].baddbmm_(b, h[c], alpha=scale)
            return y
        if k == 1:
            return torch.baddbmm(y4[0], b, h[0], alpha=scale).view(y.shape)
        return (y4 + b @ (h * scale)).view(y.shape)  # (n, out, r) @ (k, n, r, H'W')
