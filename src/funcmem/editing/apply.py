"""Editing one image of any size with a trained run (``funcmem edit``).

The editor works on fixed-size tiles at the training scale, so the image is brought to that
scale (``fit_scale``), cut into tiles (reflect-padded), and every tile gets its own generated
LoRA from its own condition, as a training crop did. The edit (edited minus unedited, at the
training scale) is resized back to the input's size and added to the original, so the output
has the input's size and keeps its detail where the edit leaves it alone.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..cli import UsageError
from ..io import atomic_write
from .data import fit_scale
from .images import read_rgb
from .rundir import Run, load_run
from .text import clean_instruction


def read_image(path: str | Path) -> Tensor:
    """(3, H, W) float in [0, 1] (``funcmem.editing.images.read_rgb``); a missing file is a
    FileNotFoundError, an unreadable or refused one an ``ImageError`` naming it and the reason."""
    return read_rgb(path)


def image_format(path: str | Path) -> str:
    """The PIL format an output file's suffix asks for; a suffix PIL cannot write is a ValueError."""
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot write an image to {path}: unknown image type {suffix or '(no suffix)'!r}; "
                         "name it .png, .jpg or .webp")
    return fmt


def write_image(image: Tensor, path: str | Path) -> None:
    """Save (3, H, W) in [0, 1] atomically (``io.atomic_write``), in the format of the path's suffix."""
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    fmt = image_format(path)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt))


@torch.no_grad()
def edit_image(run: Run, image: Tensor, instruction: str, method: str = "functional_memory") -> Tensor:
    """Edit ``image`` (3, H, W) as told, with a run from ``rundir.load_run`` -> (3, H, W)."""
    if method not in run.methods:
        raise ValueError(f"the run has no method {method!r}; it has {sorted(run.methods)}")
    instruction = clean_instruction(instruction)  # empty / too long refused, control characters removed
    tiles, grid = to_tiles(image, run.size)
    instructions = [instruction] * len(tiles)
    states, mask = run.text_encoder.encode(instructions, run.editor.config.max_text_tokens)
    batch = {"inputs": tiles, "text_states": states, "text_mask": mask, "raw": run.encoder.raw(tiles, instructions)}
    edited = run.methods[method].predict(batch)  # (gh*gw, 3, size, size)
    return from_tiles(edited, tiles, grid, image)


def to_tiles(image: Tensor, size: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Cut an image into the editor's tiles at the training scale (``fit_scale``, reflect-padded).

    Shape:
        image (3, H, W) -> tiles (gh * gw, 3, size, size), row-major, and ``grid`` (gh, gw, h, w):
        the tile grid and the scaled image's size before padding (for ``from_tiles``).
    """
    scaled = fit_scale(image, size)  # (3, h, w), short side in [size, 4 * size]
    h, w = scaled.shape[-2:]
    ph, pw = -h % size, -w % size
    padded = F.pad(scaled[None], (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")[0]
    gh, gw = padded.shape[1] // size, padded.shape[2] // size
    tiles = padded.unfold(1, size, size).unfold(2, size, size)  # (3, gh, gw, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(gh * gw, 3, size, size), (gh, gw, h, w)


def from_tiles(edited: Tensor, tiles: Tensor, grid: tuple[int, int, int, int], image: Tensor) -> Tensor:
    """The edit of each tile (edited minus input tile), stitched, resized to the image's size and
    added to it: edited, tiles (gh * gw, 3, size, size), image (3, H, W) -> (3, H, W) in [0, 1]."""
    gh, gw, h, w = grid
    size = tiles.shape[-1]
    delta = (edited.clamp(0, 1) - tiles).view(gh, gw, 3, size, size)
    delta = delta.permute(2, 0, 3, 1, 4).reshape(3, gh * size, gw * size)[:, :h, :w]
    delta = F.interpolate(delta[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
    return (image + delta).clamp(0, 1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem edit``'s options."""
    parser.add_argument("--run", required=True, help="a run directory (`funcmem demo` output)")
    parser.add_argument("image")
    parser.add_argument("instruction")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--method", default="functional_memory")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same path, a symlink or a hard link to it)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def run_cli(args: argparse.Namespace) -> int:
    if same_file(args.output, args.image):
        raise UsageError(f"-o {args.output} is the input image; write the edit to another file")
    image_format(args.output)  # refused before the work, not after
    folder = Path(args.output).parent
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {args.output}: {folder} is a file, not a folder")
    image = read_image(args.image)
    out = edit_image(load_run(args.run), image, args.instruction, args.method)
    write_image(out, args.output)
    print(f"wrote {args.output} ({out.shape[2]}x{out.shape[1]})")
    return 0
