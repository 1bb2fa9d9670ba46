"""Edit operators of the image-editing task family: six pairs of conflicting edits.

Every edit maps a clean image to an ``(input, target)`` pair whose target is a function of the
input and the instruction, so a model can learn it exactly:

| pair                  | forward edit (input = clean)           | inverse edit (target = clean)              |
| --------------------- | -------------------------------------- | ------------------------------------------ |
| blur / sharpen        | gaussian blur, sigma = 1.2 * strength  | input blurred with a random sigma          |
| add_noise / denoise   | + the FIXED "noise" pattern * 0.08 * s | input + FRESH gaussian noise, random sigma |
| age / restore         | sepia, fade, vignette, FIXED grain and | input aged with a random strength          |
|                       | scratches, all scaled by strength      |                                            |
| brighten / darken     | gamma 1.5 ** -s / gamma 1.5 ** s       | (both forward, exact inverses)             |
| contrast_up / _down   | factor 1.5 ** s / 1.5 ** -s            | (both forward, around the luminance mean)  |
| warmer / cooler       | R * 1.15 ** s, B / 1.15 ** s / reverse | (both forward, exact inverses)             |

"Add noise" adds a fixed pattern rather than fresh noise: fresh noise is unpredictable, and its
best prediction is the clean image. The fixed patterns (``fixed_pattern``) are drawn once from
seeded generators (seeds 1234, 1235, 1236), tiled with a period of 16 px (32 px for scratches)
and anchored at the image's top-left corner, so a model that knows pixel positions (the base
editor's row/column embeddings, or a UNet with 4 stride-2 levels) can produce them.

Restoration edits (sharpen, denoise, restore) degrade each sample with its own strength drawn
uniformly from ``RESTORE_RANGE``, so the right correction depends on the image, not only on
the instruction; their instructions carry no strength word.

Images are float32 in [0, 1], shaped (3, H, W) or (B, 3, H, W); every op keeps the shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from functools import lru_cache, wraps
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------- constants

STRENGTH_WORDS = {  # word -> strength; the first two are the ones sample_instruction writes
    "slightly": 0.5, "strongly": 1.6,
    "a little": 0.5, "a bit": 0.5, "subtly": 0.5,
    "a lot": 1.6, "heavily": 1.6,
}
STRENGTH_RANGE = (0.1, 2.0)  # numbers in instructions ("brighten by 0.8") are clipped to this
RESTORE_RANGE = (0.5, 1.6)  # degradation strength of restoration inputs, uniform per sample

BLUR_SIGMA = 1.2  # blur sigma per unit strength, in pixels
NOISE_SCALE = 0.08  # std of add_noise's pattern, and of denoise's fresh noise, per unit strength
GAMMA_BASE = 1.5  # brighten: gamma = GAMMA_BASE ** -s; darken: GAMMA_BASE ** s
CONTRAST_BASE = 1.5  # contrast_up: factor CONTRAST_BASE ** s; contrast_down: ** -s
TEMPERATURE_BASE = 1.15  # warmer: R * base ** s, B / base ** s

PATTERN_SEEDS = {"noise": 1234, "grain": 1235, "scratches": 1236}
PATTERN_TILES = {"noise": (3, 16, 16), "grain": (1, 16, 16), "scratches": (1, 32, 32)}  # (C, h, w)

SEPIA = torch.tensor([[0.393, 0.769, 0.189],
                      [0.349, 0.686, 0.168],
                      [0.272, 0.534, 0.131]])
PAPER_TONE = torch.tensor([0.85, 0.80, 0.70])  # the faded print's colour


# ---------------------------------------------------------------- helpers


def _as_batch(x: Tensor) -> tuple[Tensor, bool]:
    """(3, H, W) or (B, 3, H, W) -> (B, 3, H, W), and whether to squeeze the batch back."""
    if x.dim() == 3:
        return x[None], True
    if x.dim() == 4:
        return x, False
    raise ValueError(f"expected an image (3, H, W) or batch (B, 3, H, W), got shape {tuple(x.shape)}")


def _per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """A float or (B,) tensor as (B, 1, 1, 1) on x's device, for x (B, C, H, W)."""
    v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if v.dim() == 0:
        return v.expand(x.shape[0]).reshape(-1, 1, 1, 1)
    if v.shape != (x.shape[0],):
        raise ValueError(f"per-sample value of shape {tuple(v.shape)} does not match batch {x.shape[0]}")
    return v.reshape(-1, 1, 1, 1)


def _batched(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Let an op written for (B, 3, H, W) also take (3, H, W)."""
    @wraps(fn)
    def wrapper(x: Tensor, *args, **kwargs) -> Tensor:
        xb, squeeze = _as_batch(x)
        y = fn(xb, *args, **kwargs)
        return y[0] if squeeze else y
    return wrapper


# ---------------------------------------------------------------- primitive ops


def luminance(x: Tensor) -> Tensor:
    """Rec. 601 luma of x (..., 3, H, W) -> (..., 1, H, W)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
    return (x * w[:, None, None]).sum(-3, keepdim=True)


@_batched
def gaussian_blur(x: Tensor, sigma: float | Tensor) -> Tensor:
    """Separable gaussian blur with reflect padding, each kernel cut at 3 sigma.

    Args:
        x: images in [0, 1].
        sigma: std in pixels, a float or one per sample (B,); 0 leaves the image unchanged.
    Shape:
        x: (B, 3, H, W) or (3, H, W); output: same.
    """
    B, C, H, W = x.shape
    sig = _per_sample(sigma, x).reshape(B, 1).clamp_min(1e-3)  # (B, 1)
    radius = min(math.ceil(3 * float(sig.max())), H - 1, W - 1)  # reflect padding needs r < side
    if radius <= 0:
        return x.clone()
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # (K,)
    k = torch.exp(-t**2 / (2 * sig**2)) * (t.abs() <= torch.ceil(3 * sig))  # (B, K), each cut at its 3 sigma
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (B*C, K), one kernel per channel
    y = x.reshape(1, B * C, H, W)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=B * C)
    return y.reshape(B, C, H, W)


@_batched
def adjust_gamma(x: Tensor, gamma: float | Tensor) -> Tensor:
    """x ** gamma, per sample; gamma < 1 brightens, > 1 darkens. Shape: kept."""
    return x.clamp(0, 1) ** _per_sample(gamma, x)


@_batched
def adjust_contrast(x: Tensor, factor: float | Tensor) -> Tensor:
    """Scale each image's deviation from its mean luminance by ``factor``, clamped. Shape: kept."""
    mean = luminance(x).mean(dim=(-2, -1), keepdim=True)  # (B, 1, 1, 1)
    return (mean + _per_sample(factor, x) * (x - mean)).clamp(0, 1)


@_batched
def color_temperature(x: Tensor, amount: float | Tensor) -> Tensor:
    """Warm (amount > 0) or cool (< 0): R * k and B / k with k = 1.15 ** amount. Shape: kept."""
    k = TEMPERATURE_BASE ** _per_sample(amount, x)  # (B, 1, 1, 1)
    r, g, b = x.unbind(1)
    return torch.stack((r * k[:, 0], g, b / k[:, 0]), dim=1).clamp(0, 1)


def sepia(x: Tensor) -> Tensor:
    """The classic sepia tone matrix, clamped. Shape: (..., 3, H, W) kept."""
    return torch.einsum("oc,...chw->...ohw", SEPIA.to(x), x).clamp(0, 1)


def vignette(h: int, w: int) -> Tensor:
    """Squared radius from the centre, 0 there and 1 in the corners: (1, h, w)."""
    yy = torch.linspace(-1, 1, h)[:, None]
    xx = torch.linspace(-1, 1, w)[None, :]
    return ((yy**2 + xx**2) / 2)[None]


@lru_cache(maxsize=None)
def _pattern_tile(name: str) -> Tensor:
    """One period of a fixed pattern, drawn once from its seed: (C, h, w)."""
    c, h, w = PATTERN_TILES[name]
    g = torch.Generator().manual_seed(PATTERN_SEEDS[name])
    if name in ("noise", "grain"):  # standard normal, exactly zero-mean and unit-std
        p = torch.randn(c, h, w, generator=g)
        return (p - p.mean()) / p.std()
    # scratches: two broken 1-px vertical lines at fixed columns, intensity in [0, 1]
    p = torch.zeros(c, h, w)
    for col in torch.randperm(w, generator=g)[:2].tolist():
        p[0, :, col] = torch.rand(h, generator=g) * (torch.rand(h, generator=g) > 0.3)
    return p


def fixed_pattern(name: str, h: int, w: int) -> Tensor:
    """A fixed, seeded pattern tiled to (C, h, w), anchored at the top-left corner.

    Args:
        name: "noise" (3 channels, N(0, 1), seed 1234, period 16 px), "grain" (1 channel,
            N(0, 1), seed 1235, period 16 px) or "scratches" (1 channel, values in [0, 1],
            seed 1236, period 32 px).
    Returns:
        The same tensor for the same (name, h, w) on every call; larger sizes repeat the tile.
    """
    if name not in PATTERN_TILES:
        raise ValueError(f"unknown pattern {name!r}; known: {sorted(PATTERN_TILES)}")
    tile = _pattern_tile(name)
    _, th, tw = tile.shape
    return tile.repeat(1, -(-h // th), -(-w // tw))[:, :h, :w]


# ---------------------------------------------------------------- the edits as functions of strength


@_batched
def blur(x: Tensor, s: float | Tensor) -> Tensor:
    """Gaussian blur with sigma = BLUR_SIGMA * s."""
    return gaussian_blur(x, BLUR_SIGMA * torch.as_tensor(s, dtype=x.dtype))


@_batched
def add_fixed_noise(x: Tensor, s: float | Tensor) -> Tensor:
    """x + NOISE_SCALE * s * fixed_pattern("noise"), clamped."""
    pattern = fixed_pattern("noise", *x.shape[-2:]).to(x)  # (3, H, W)
    return (x + NOISE_SCALE * _per_sample(s, x) * pattern).clamp(0, 1)


@_batched
def add_fresh_noise(x: Tensor, s: float | Tensor, rng: torch.Generator) -> Tensor:
    """x + fresh N(0, (NOISE_SCALE * s)^2) noise from rng, clamped."""
    noise = torch.randn(x.shape, generator=rng, device=rng.device).to(x)
    return (x + NOISE_SCALE * _per_sample(s, x) * noise).clamp(0, 1)


@_batched
def age(x: Tensor, s: float | Tensor) -> Tensor:
    """An old print: sepia, fading to paper, vignette, fixed grain, fixed scratches; s = 0 is identity."""
    s = _per_sample(s, x)  # (B, 1, 1, 1)
    h, w = x.shape[-2:]
    x = torch.lerp(x, sepia(x), (0.6 * s).clamp(max=1))
    x = torch.lerp(x, PAPER_TONE.to(x)[:, None, None].expand_as(x), (0.2 * s).clamp(max=0.5))
    x = x * (1 - 0.3 * s * vignette(h, w).to(x)).clamp_min(0)
    x = x + 0.05 * s * fixed_pattern("grain", h, w).to(x)
    scratches = (0.7 * s).clamp(max=1) * fixed_pattern("scratches", h, w).to(x)  # (B, 1, H, W)
    return torch.lerp(x, torch.full_like(x, 0.95), scratches).clamp(0, 1)


# ---------------------------------------------------------------- Edit


def _forward(fn: Callable[[Tensor, Tensor], Tensor]):
    """A forward edit: input is the clean image, target is fn(clean, strength)."""
    def apply(clean: Tensor, strength: float | Tensor, rng: torch.Generator | None) -> tuple[Tensor, Tensor]:
        return clean, fn(clean, strength)
    return apply


def _inverse(degrade: Callable[[Tensor, Tensor, torch.Generator], Tensor]):
    """A restoration edit: input is degrade(clean, random strength per sample), target is clean."""
    def apply(clean: Tensor, strength: float | Tensor, rng: torch.Generator | None) -> tuple[Tensor, Tensor]:
        if rng is None:
            raise ValueError("restoration edits draw a random degradation per sample: pass rng (a torch.Generator)")
        xb, squeeze = _as_batch(clean)
        lo, hi = RESTORE_RANGE
        s = (lo + (hi - lo) * torch.rand(xb.shape[0], generator=rng, device=rng.device)).to(xb)  # (B,)
        degraded = degrade(xb, s, rng)
        return (degraded[0], clean) if squeeze else (degraded, clean)
    return apply


@dataclass(frozen=True)
class Edit:
    """One edit of the family.

    Args:
        name: the edit's key in ``EDITS``.
        inverse: the name of the edit that undoes it.
        train_phrasings: instructions used in training (no strength words).
        test_phrasings: held-out instructions, worded differently.
        has_strength: whether instructions carry a strength (forward edits); restoration edits
            have none, their input's degradation strength is random.
    """

    name: str
    inverse: str
    train_phrasings: tuple[str, ...]
    test_phrasings: tuple[str, ...]
    has_strength: bool
    fn: Callable[..., tuple[Tensor, Tensor]] = field(repr=False, compare=False)

    def apply(self, clean: Tensor, strength: float | Tensor = 1.0,
              rng: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Make an (input, target) pair from clean images.

        Args:
            clean: images in [0, 1].
            strength: a float or one per sample (B,); ignored by restoration edits, which draw
                their degradation strength from ``RESTORE_RANGE`` with ``rng``.
            rng: random generator; required by restoration edits.
        Shape:
            clean: (B, 3, H, W) or (3, H, W); input and target: same.
        """
        _as_batch(clean)  # validates the shape
        return self.fn(clean, strength, rng)


def _edit(name, inverse, train, test, fn, has_strength=True) -> Edit:
    return Edit(name, inverse, tuple(train), tuple(test), has_strength, fn)


EDITS: dict[str, Edit] = {e.name: e for e in [
    _edit("blur", "sharpen",
          ["blur the image", "make it blurry", "add some blur", "soften the focus",
           "make the photo out of focus", "apply a gaussian blur"],
          ["defocus this picture", "give the shot a soft, hazy look"],
          _forward(blur)),
    _edit("sharpen", "blur",
          ["sharpen the image", "make it sharper", "deblur this photo", "remove the blur",
           "bring the picture into focus", "fix the blurry photo"],
          ["restore crisp details in this shot", "undo the softness and make edges crisp"],
          _inverse(lambda x, s, rng: blur(x, s)), has_strength=False),
    _edit("add_noise", "denoise",
          ["add noise to the image", "make it grainy", "add film grain", "make the photo noisy",
           "add some grain", "put grain on the picture"],
          ["give this shot a speckled texture", "sprinkle noise over the photo"],
          _forward(add_fixed_noise)),
    _edit("denoise", "add_noise",
          ["denoise the image", "remove the noise", "clean up the grain", "make it less noisy",
           "reduce the noise in this photo", "get rid of the grain"],
          ["smooth out the noisy speckles in this shot", "clear the static from the picture"],
          _inverse(add_fresh_noise), has_strength=False),
    _edit("age", "restore",
          ["make it look old", "age the photo", "make it look like an old damaged photo",
           "give it a vintage look", "turn this into an antique photograph",
           "make the picture look aged and worn"],
          ["make this shot look like it came from a century-old album",
           "weather the image like a faded old print"],
          _forward(age)),
    _edit("restore", "age",
          ["restore this old photo", "repair the damaged photo", "remove the scratches and fading",
           "undo the aging", "fix this vintage photo", "bring the old picture back to its original state"],
          ["clean up this worn antique print", "make this faded, scratched shot look new again"],
          _inverse(lambda x, s, rng: age(x, s)), has_strength=False),
    _edit("brighten", "darken",
          ["make it brighter", "brighten the photo", "increase the brightness", "lighten this image",
           "raise the exposure", "make the picture lighter"],
          ["boost the brightness of this shot", "give the image more light"],
          _forward(lambda x, s: adjust_gamma(x, GAMMA_BASE ** -torch.as_tensor(s, dtype=x.dtype)))),
    _edit("darken", "brighten",
          ["make it darker", "darken the photo", "decrease the brightness", "dim this image",
           "lower the exposure", "make the picture less bright"],
          ["reduce the light in this shot", "give the image a dimmer, moodier look"],
          _forward(lambda x, s: adjust_gamma(x, GAMMA_BASE ** torch.as_tensor(s, dtype=x.dtype)))),
    _edit("contrast_up", "contrast_down",
          ["increase the contrast", "add more contrast", "make it more contrasty", "boost the contrast",
           "make the colors pop", "raise the contrast of the photo"],
          ["make the darks darker and the lights lighter", "give the picture more punch"],
          _forward(lambda x, s: adjust_contrast(x, CONTRAST_BASE ** torch.as_tensor(s, dtype=x.dtype)))),
    _edit("contrast_down", "contrast_up",
          ["decrease the contrast", "reduce the contrast", "make it less contrasty",
           "lower the contrast of the photo", "flatten the contrast", "make the image look flatter"],
          ["tone down the difference between light and dark", "give the shot a washed-out, low-contrast feel"],
          _forward(lambda x, s: adjust_contrast(x, CONTRAST_BASE ** -torch.as_tensor(s, dtype=x.dtype)))),
    _edit("warmer", "cooler",
          ["make it warmer", "warm up the colors", "add a warm tint", "make the photo more orange",
           "increase the color temperature", "give it a warmer tone"],
          ["make this shot feel like golden hour", "shift the white balance toward yellow"],
          _forward(lambda x, s: color_temperature(x, s))),
    _edit("cooler", "warmer",
          ["make it cooler", "cool down the colors", "add a cool tint", "make the photo more blue",
           "decrease the color temperature", "give it a colder tone"],
          ["make this shot feel like a winter morning", "shift the white balance toward blue"],
          _forward(lambda x, s: color_temperature(x, -torch.as_tensor(s, dtype=x.dtype)))),
]}

INVERSE_PAIRS: list[tuple[str, str]] = [
    ("blur", "sharpen"), ("add_noise", "denoise"), ("age", "restore"),
    ("brighten", "darken"), ("contrast_up", "contrast_down"), ("warmer", "cooler"),
]


# ---------------------------------------------------------------- instructions

_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?|\.\d+)(?![\w])")
_WORDS = re.compile(r"\b(" + "|".join(sorted(map(re.escape, STRENGTH_WORDS), key=len, reverse=True)) + r")\b")


def parse_strength(instruction: str) -> float:
    """The strength an instruction asks for.

    A number ("brighten by 0.8") wins and is clipped to ``STRENGTH_RANGE`` (0.1 to 2.0);
    otherwise a strength word ("slightly" or "a little" 0.5, "strongly" or "a lot" 1.6, see
    ``STRENGTH_WORDS``); otherwise 1.0.
    """
    text = instruction.lower()
    if m := _NUMBER.search(text):
        lo, hi = STRENGTH_RANGE
        return min(max(float(m.group(1)), lo), hi)
    if m := _WORDS.search(text):
        return STRENGTH_WORDS[m.group(1)]
    return 1.0


def sample_instruction(edit: Edit, split: str, rng: torch.Generator,
                       numbers: bool = False) -> tuple[str, float]:
    """A random instruction for an edit and the strength it asks for.

    Args:
        edit: the edit.
        split: "train" or "test": which phrasing set to draw from.
        rng: random generator.
        numbers: also write numeric strengths ("... by 1.3", uniform in 0.3 to 1.8).
    Returns:
        (text, strength). Forward edits get "slightly", no word or "strongly" with equal odds
        (and a number as a fourth option with ``numbers``), written after the phrasing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    phrasings = edit.train_phrasings if split == "train" else edit.test_phrasings
    text = phrasings[int(torch.randint(len(phrasings), (), generator=rng))]
    if not edit.has_strength:
        return text, 1.0
    level = int(torch.randint(4 if numbers else 3, (), generator=rng))
    if level == 3:
        value = 0.3 + 1.5 * float(torch.rand((), generator=rng))
        text = f"{text} by {value:.1f}"
    else:
        text = [f"{text} slightly", text, f"{text} strongly"][level]
    return text, parse_strength(text)
