"""Editing one image of any size with a trained run (``funcmem edit``).

The editor works on fixed-size tiles at the training scale, so the image is brought to that
scale (``fit_scale``), cut into tiles (reflect-padded), and every tile gets its own generated
LoRA from its own condition, as a training crop did. The edit (edited minus unedited, at the
training scale) is resized back to the input's size and added to the original, so the output
has the input's size and keeps its detail where the edit leaves it alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .data import _read_rgb, fit_scale


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) float in [0, 1]; a missing or unreadable file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        return _read_rgb(path)
    except Exception as e:
        raise ValueError(f"cannot read {path} as an image: {e}") from None


def write_image(image: Tensor, path: str | Path) -> None:
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@torch.no_grad()
def edit_image(loaded: dict, image: Tensor, instruction: str, method: str = "functional_memory") -> Tensor:
    """Edit ``image`` (3, H, W) as told, with a run from ``benchmark.load_run`` -> (3, H, W)."""
    if not instruction or not instruction.strip():
        raise ValueError("the instruction is empty")
    size = loaded["config"].size
    scaled = fit_scale(image, size)  # (3, h, w), short side in [size, 4 * size]
    h, w = scaled.shape[-2:]
    ph, pw = -h % size, -w % size
    padded = F.pad(scaled[None], (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")[0]
    gh, gw = padded.shape[1] // size, padded.shape[2] // size
    tiles = padded.unfold(1, size, size).unfold(2, size, size)  # (3, gh, gw, size, size)
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(gh * gw, 3, size, size)
    instructions = [instruction] * len(tiles)
    states, mask = loaded["text_encoder"].encode(instructions, loaded["editor"].config.max_text_tokens)
    batch = {"inputs": tiles, "text_states": states, "text_mask": mask,
             "raw": loaded["encoder"].raw(tiles, instructions)}
    edited = loaded["methods"][method].predict(batch).clamp(0, 1)  # (gh*gw, 3, size, size)
    edited = edited.view(gh, gw, 3, size, size).permute(2, 0, 3, 1, 4).reshape(3, gh * size, gw * size)
    delta = (edited - padded)[:, :h, :w]
    delta = F.interpolate(delta[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    return (image + delta).clamp(0, 1)
