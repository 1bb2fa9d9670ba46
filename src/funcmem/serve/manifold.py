"""Where a request's generated LoRA lands on the run's parameter manifold (for the web page).

The editing benchmark plots the PCA of its test set's generated LoRAs, but a run directory does
not keep that basis, so the service builds one at start-up the same way: the LoRAs the run's
generator writes for one example instruction per edit on a few crops of a bundled photo,
flattened, centred, first two principal components. A request's LoRA (the mean of its tiles'
flattened factors) is projected onto them: two numbers, sent in the ``X-Manifold-Point`` header.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..editing.data import load_photos, random_crops
from ..editing.ops import EDITS
from ..lora import LoRA

PHOTO = "chelsea"  # ships inside scikit-image
CROPS = 4


def example_instructions() -> dict[str, str]:
    """One example instruction per edit: {edit name: its first training phrasing} (tint's in red)."""
    return {name: edit.example() for name, edit in EDITS.items()}


@dataclass
class Manifold:
    """A 2-D PCA basis of generated LoRAs and the reference points it was fitted on.

    Args:
        mean: (P,) mean flattened LoRA; components: (2, P) principal axes.
        points: (n, 2) reference LoRAs' coordinates; labels: their edit names.
        explained: share of the reference variance the two axes hold.
    """

    mean: Tensor
    components: Tensor
    points: Tensor
    labels: list[str]
    explained: float

    def project(self, lora: LoRA) -> tuple[float, float]:
        """2-D coordinates of a LoRA (the mean of its rows)."""
        flat = lora.flatten().float().mean(0)
        x, y = ((flat - self.mean) @ self.components.T).tolist()
        return x, y

    def to_json(self) -> dict:
        return {"points": [[round(x, 5), round(y, 5)] for x, y in self.points.tolist()], "labels": self.labels,
                "explained_2d": self.explained, "examples": example_instructions(),
                "source": f"start-up PCA: one instruction per edit on {len(self.labels) // len(set(self.labels))} "
                          f"crops of the bundled photo '{PHOTO}'"}


@torch.inference_mode()
def fit_manifold(engine, crops: int = CROPS) -> Manifold:
    """The basis for an ``EditEngine``'s generator, from ``crops`` crops per example instruction
    (a second or two on an idle CPU)."""
    photo = load_photos([PHOTO])[0]
    tiles = random_crops(photo, crops, engine.size, torch.Generator().manual_seed(0))  # (crops, 3, S, S)
    examples = example_instructions()
    tiles = tiles.repeat(len(examples), 1, 1, 1)
    instructions = [text for text in examples.values() for _ in range(crops)]
    labels = [name for name in examples for _ in range(crops)]
    engine._text(instructions)
    flat = engine.generate(tiles, instructions).flatten().float()  # (n, P)
    mean = flat.mean(0)
    centered = flat - mean
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    components = vh[:2]
    total = s.pow(2).sum().item()
    explained = s[:2].pow(2).sum().item() / total if total > 0 else 0.0
    return Manifold(mean, components, centered @ components.T, labels, explained)
