"""Image metrics: PSNR and SSIM on images in [0, 1], per sample.

SSIM: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03 (Wang et al. 2004), computed per
channel with reflect padding and averaged over channels and pixels. Implementations differ in
these choices; keep this one when comparing runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(pred: Tensor, target: Tensor) -> Tensor:
    """(B, C, H, W) x2 -> (B,) dB, with pred clamped to [0, 1] (capped at 100 dB for equal images)."""
    mse = (pred.clamp(0, 1) - target).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(1.0 / mse.clamp(min=1e-10))).clamp(max=100.0)


def _window(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).float()


def ssim(pred: Tensor, target: Tensor, window: int = 11) -> Tensor:
    """(B, C, H, W) x2 -> (B,) structural similarity, pred clamped to [0, 1]."""
    pred = pred.clamp(0, 1)
    c = pred.shape[1]
    g = _window(window).to(pred)
    kernel_h, kernel_w = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1), g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_w, groups=c)

    mu_x, mu_y = blur(pred), blur(target)
    var_x = blur(pred * pred) - mu_x ** 2
    var_y = blur(target * target) - mu_y ** 2
    cov = blur(pred * target) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
