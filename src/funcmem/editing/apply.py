"""Editing one image of any size with a trained run (``funcmem edit``; the service uses the same steps).

The editor works on fixed-size tiles at the training scale, so the image is brought to that
scale (``tile_grid``) and cut into tiles of side S that overlap by half (stride S/2; the last
row and column reflect-padded), and every tile gets its own generated LoRA from its own
condition, as a training crop did. Each tile's edit (edited minus unedited) is weighted by a
smooth window that falls to ~0 at the tile's edges, normalised so the weights of the tiles
covering any pixel sum to 1 (``blend_weights``), and summed into one edit of the scaled image
(``stitch``): neighbouring tiles' LoRAs differ, but the edit fades from one to the next instead of
jumping at a tile border (``seam_score`` measures it). That edit is resized back to the input's
size and added to the original (``blend``), so the output has the input's size and keeps its
detail wherever the edit is zero.

Work is bounded by the input, whatever its size:

- at most ``max_tiles`` tiles per image, overlapping ones counted: a large or wide image is
  edited at a coarser scale (its long side shrunk until its tiles fit), and an image too
  elongated to fit even at the smallest scale (short side = one tile) is refused with
  ``TooManyTiles``, which names the limit;
- the models see ``chunk`` tiles at a time, so their memory does not grow with the image;
- the full-resolution image stays uint8 (H, W, 3) and the edit is added to it in strips of rows,
  so memory beyond the input and output arrays is a few MB, not a float copy of every pixel.

Shapes: images are (H, W, 3), uint8 or float in [0, 1] (the output has the input's dtype); tiles
are (n, 3, S, S) float; the edit at the training scale is (3, h, w).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..cli import UsageError
from ..io import atomic_write, read_json
from .images import FORMATS, probe, read_bytes, read_rgb, read_rgb8
from .rundir import CONFIG_NAME, Run, check_run, load_run
from .text import clean_instruction

MAX_TILES = 64  # tiles per image: see docs/serving.md for the measured cost behind it
CHUNK = 16  # tiles per model call
MAX_SCALE = 4.0  # the short side at the training scale lies in [S, MAX_SCALE * S] (``data.fit_scale``)
STRIP_BYTES = 2**20  # float work per strip of rows in ``blend`` (larger strips were slower and took more RSS)


class TooManyTiles(ValueError):
    """An image whose side ratio needs more tiles than the limit even at the smallest scale."""


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


def write_image(image: Tensor | np.ndarray, path: str | Path) -> None:
    """Save a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array atomically
    (``io.atomic_write``), in the format of the path's suffix."""
    if isinstance(image, Tensor):
        image = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    fmt = image_format(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format=fmt))


class Grid(NamedTuple):
    """Where an image's tiles lie: ``rows`` x ``cols`` tiles of side ``size``, one every ``stride`` px,
    covering the image scaled to ``h`` x ``w`` (the last row and column padded past it)."""

    rows: int
    cols: int
    h: int
    w: int
    size: int
    stride: int

    @property
    def padded(self) -> tuple[int, int]:
        """The side lengths the tiles cover: (size + (rows - 1) * stride, size + (cols - 1) * stride)."""
        return self.size + (self.rows - 1) * self.stride, self.size + (self.cols - 1) * self.stride


def tiles_along(length: int, size: int, stride: int) -> int:
    """How many tiles of ``size`` every ``stride`` px cover ``length`` px (at least one)."""
    return 1 + max(0, -(-(length - size) // stride))


def default_stride(size: int) -> int:
    """Half a tile (rounded down, at least 1): every pixel away from the border lies in two tiles a side."""
    return max(1, size // 2)


def tile_grid(height: int, width: int, size: int, max_tiles: int = MAX_TILES, stride: int | None = None) -> Grid:
    """The tiling of an image of ``height`` x ``width``: a ``Grid`` of tiles of ``size`` every
    ``stride`` px (default half a tile; ``stride=size``: tiles side by side) covering it scaled to h x w.

    The scale is ``data.fit_scale``'s (short side brought into [size, 4 * size]) unless that
    needs more than ``max_tiles`` tiles; then the short side shrinks until they fit.

    Raises:
        TooManyTiles: even with its short side at ``size`` the image needs more than ``max_tiles``.
        ValueError: a stride outside [1, size].
    """
    stride = default_stride(size) if stride is None else stride
    if not 1 <= stride <= size:
        raise ValueError(f"the tile stride must be in [1, {size}] (the tile size), got {stride}")
    short = min(height, width)
    target = min(max(short, size), MAX_SCALE * size)
    for t in [target, *range(math.ceil(target) - 1, size - 1, -1)]:
        h, w = (height, width) if t == short else (max(size, round(d * t / short)) for d in (height, width))
        grid = Grid(tiles_along(h, size, stride), tiles_along(w, size, stride), h, w, size, stride)
        if grid.rows * grid.cols <= max_tiles:
            return grid
    ratio = max(height, width) / short
    fits = 1 + (max_tiles - 1) * stride / size  # the longest side ratio whose one row of tiles fits
    raise TooManyTiles(f"the image is {width}x{height} (side ratio {ratio:.0f}:1): it needs {grid.rows * grid.cols} "
                       f"tiles of {size} px every {stride} px even at the smallest scale; the limit is {max_tiles} "
                       f"tiles (crop it to a side ratio of at most {math.floor(fits)}:1)")


def to_tiles(image: Tensor | np.ndarray, size: int, max_tiles: int = MAX_TILES,
             stride: int | None = None) -> tuple[Tensor, Grid]:
    """Cut an image into the editor's tiles at the training scale (``tile_grid``; padded by reflection).

    Shape:
        image (H, W, 3) uint8 or float -> tiles (rows * cols, 3, size, size) float, row-major, and
        their ``Grid``.
    """
    image = torch.as_tensor(image)
    grid = tile_grid(*image.shape[:2], size, max_tiles, stride)
    h, w = grid.h, grid.w
    x = image.permute(2, 0, 1)[None]  # (1, 3, H, W), a channels-last view: uint8 resizes without a float copy
    if (h, w) != tuple(image.shape[:2]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    scaled = x[0].float() / 255 if image.dtype == torch.uint8 else x[0].float().clamp(0, 1)  # (3, h, w)
    ph, pw = grid.padded[0] - h, grid.padded[1] - w
    padded = F.pad(scaled[None], (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")[0]
    tiles = padded.unfold(1, size, grid.stride).unfold(2, size, grid.stride)  # (3, rows, cols, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size).contiguous(), grid


def window(size: int) -> Tensor:
    """(size,) sin^2(pi (i + 1/2) / size): near 0 at both ends, 1 in the middle, and two copies half a
    tile apart sum to 1 (sin^2 + cos^2), so half-overlapping tiles cross-fade."""
    return torch.sin(math.pi * (torch.arange(size, dtype=torch.float32) + 0.5) / size) ** 2


def _fold(columns: Tensor, grid: Grid) -> Tensor:
    """Sum tiles (n, c, S, S) into their places: (c, *grid.padded), overlaps added."""
    n, c, size, _ = columns.shape
    flat = columns.reshape(n, c * size * size).T[None]  # (1, c * S * S, n), the layout F.fold reads
    return F.fold(flat, grid.padded, kernel_size=size, stride=grid.stride)[0]


def blend_weights(grid: Grid) -> Tensor:
    """Each tile's per-pixel weight, (rows * cols, 1, S, S): the separable ``window`` divided by the
    sum of the windows of every tile covering that pixel, so the weights at any pixel sum to 1
    (near the image's border, where one tile covers a pixel, its weight is 1)."""
    win = window(grid.size)
    win2 = (win[:, None] * win[None, :]).expand(grid.rows * grid.cols, 1, grid.size, grid.size)
    total = _fold(win2, grid)  # (1, *padded), > 0 everywhere
    cover = total.unfold(1, grid.size, grid.stride).unfold(2, grid.size, grid.stride)  # (1, rows, cols, S, S)
    return win2 / cover.reshape(grid.rows * grid.cols, 1, grid.size, grid.size)


def stitch(edited: Tensor, tiles: Tensor, grid: Grid) -> Tensor:
    """The tiles' edits (edited minus input tile) cross-faded into one edit of the scaled image:
    (3, h, w), from edited and tiles (rows * cols, 3, S, S) (``blend_weights``)."""
    delta = (edited.clamp(0, 1) - tiles) * blend_weights(grid)
    return _fold(delta, grid)[:, :grid.h, :grid.w]


def seam_score(delta: Tensor, period: int, within: int = 1) -> float:
    """How much an edit (3, h, w) jumps at tile borders: the mean absolute step between neighbouring
    pixels across the lines every ``period`` px (rows and columns), divided by the mean absolute step
    across the other lines every ``within`` px (1: every other step; the editor's patch size: the
    other patch borders, since a patch editor's output has its own small steps there).

    1.0: the tile borders look like the rest; tiles whose edits disagree score far above. NaN when
    there is no border or no other line (a side shorter than ``period`` + 1 px).
    """
    border, other = [], []
    for dim in (1, 2):  # steps across rows, across columns
        step = delta.diff(dim=dim).abs()
        line = torch.arange(1, step.shape[dim] + 1)  # the step from pixel line - 1 to line
        at, ref = line % period == 0, (line % within == 0) & (line % period != 0)
        shape = (-1, 1) if dim == 1 else (1, -1)
        border.append(step[:, at.view(shape).expand(step.shape[1:])].flatten())
        other.append(step[:, ref.view(shape).expand(step.shape[1:])].flatten())
    border, other = torch.cat(border), torch.cat(other)
    if border.numel() == 0 or other.numel() == 0:
        return float("nan")
    return float(border.mean() / other.mean().clamp(min=1e-12))


def blend(image: Tensor | np.ndarray, delta: Tensor) -> Tensor:
    """``image`` plus ``delta`` resized (bilinear) to its size, clamped: (H, W, 3) + (3, h, w) ->
    (H, W, 3) of the image's dtype. Done in strips of rows, so the float work is a few MB whatever
    the image's size (the same numbers as ``F.interpolate(delta, (H, W))``, to float rounding)."""
    image = torch.as_tensor(image)
    H, W = image.shape[:2]
    h = delta.shape[1]
    wide = F.interpolate(delta[None].float(), size=(h, W), mode="bilinear", align_corners=False)[0]  # (3, h, W)
    src = ((torch.arange(H, dtype=torch.float32) + 0.5) * (h / H) - 0.5).clamp(min=0)  # PyTorch's source rows
    top = src.long().clamp(max=h - 1)
    below = (top + 1).clamp(max=h - 1)
    frac = (src - top)[:, None, None]  # (H, 1, 1)
    out = torch.empty_like(image)
    step = max(1, STRIP_BYTES // (4 * 3 * W))
    for r in (slice(s, s + step) for s in range(0, H, step)):
        rows = (wide[:, top[r]].permute(1, 2, 0) * (1 - frac[r]) + wide[:, below[r]].permute(1, 2, 0) * frac[r])
        if image.dtype == torch.uint8:
            out[r] = (image[r].float() + rows * 255).round_().clamp_(0, 255).to(torch.uint8)
        else:
            out[r] = (image[r] + rows).clamp_(0, 1)
    return out


def from_tiles(edited: Tensor, tiles: Tensor, grid: Grid, image: Tensor | np.ndarray) -> Tensor:
    """The edited tiles' change added to the full-size image: (H, W, 3) of the image's dtype."""
    return blend(image, stitch(edited, tiles, grid))


def predict(run: Run, method: str, tiles: Tensor, instruction: str, chunk: int = CHUNK) -> Tensor:
    """A method's edit of tiles (n, 3, S, S), ``chunk`` tiles at a time -> (n, 3, S, S)."""
    out = []
    for s in range(0, len(tiles), chunk):
        part = tiles[s:s + chunk]
        texts = [instruction] * len(part)
        base_texts = texts if run.base_text is None else [run.base_text] * len(part)
        states, mask = run.text_encoder.encode(base_texts, run.editor.config.max_text_tokens)
        batch = {"inputs": part, "text_states": states, "text_mask": mask, "raw": run.encoder.raw(part, texts)}
        out.append(run.methods[method].predict(batch))
    return torch.cat(out)


@torch.no_grad()
def edit_parts(run: Run, image: Tensor | np.ndarray, instruction: str, method: str = "functional_memory",
               max_tiles: int = MAX_TILES, chunk: int = CHUNK, stride: int | None = None) -> tuple[Tensor, Tensor, Grid]:
    """``edit_array``'s output and how it was made: (output (H, W, 3) of the image's dtype, the edit
    at the training scale (3, h, w) that was added to the image, the tiles' ``Grid``)."""
    if method not in run.methods:
        raise ValueError(f"the run has no method {method!r}; it has {sorted(run.methods)}")
    instruction = clean_instruction(instruction)  # empty / too long refused, control characters removed
    tiles, grid = to_tiles(image, run.size, max_tiles, stride)
    delta = stitch(predict(run, method, tiles, instruction, chunk), tiles, grid)
    return blend(image, delta), delta, grid


def edit_array(run: Run, image: Tensor | np.ndarray, instruction: str, method: str = "functional_memory",
               max_tiles: int = MAX_TILES, chunk: int = CHUNK, stride: int | None = None) -> Tensor:
    """Edit an (H, W, 3) image (uint8, or float in [0, 1]) as told -> (H, W, 3) of its dtype
    (``stride``: the tiles' step, default half a tile; ``tile_grid``).

    Raises:
        ValueError: an unknown method, an empty or too long instruction; ``TooManyTiles``.
    """
    return edit_parts(run, image, instruction, method, max_tiles, chunk, stride)[0]


def edit_image(run: Run, image: Tensor, instruction: str, method: str = "functional_memory",
               max_tiles: int = MAX_TILES, chunk: int = CHUNK, stride: int | None = None) -> Tensor:
    """Edit a (3, H, W) float image in [0, 1] with a run from ``rundir.load_run`` -> (3, H, W)."""
    return edit_array(run, image.permute(1, 2, 0), instruction, method, max_tiles, chunk, stride).permute(2, 0, 1)


def tile_size(run: str | Path) -> int:
    """A run directory's tile side, from its config.json alone (nothing loaded)."""
    return read_json(check_run(run) / CONFIG_NAME)["size"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem edit``'s options."""
    parser.add_argument("--run", required=True, help="a run directory (`funcmem demo` output)")
    parser.add_argument("image")
    parser.add_argument("instruction")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--method", default="functional_memory")
    parser.add_argument("--max-tiles", type=int, default=MAX_TILES,
                        help="most tiles an image is cut into; a larger image is edited at a coarser scale")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="tiles per model call (memory, not results)")


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file (the same path, a symlink or a hard link to it)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def run_cli(args: argparse.Namespace) -> int:
    if args.max_tiles < 1 or args.chunk < 1:
        raise UsageError(f"--max-tiles and --chunk must be at least 1, got {args.max_tiles} and {args.chunk}")
    if same_file(args.output, args.image):
        raise UsageError(f"-o {args.output} is the input image; write the edit to another file")
    image_format(args.output)  # refused before the work, not after
    folder = Path(args.output).parent
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"-o {args.output}: {folder} is a file, not a folder")
    _, width, height = probe(read_bytes(args.image), args.image, FORMATS)
    tile_grid(height, width, tile_size(args.run), args.max_tiles)  # refused before decoding or loading anything
    image = read_rgb8(args.image)
    out = edit_array(load_run(args.run), image, args.instruction, args.method, args.max_tiles, args.chunk)
    write_image(out.numpy(), args.output)
    print(f"wrote {args.output} ({out.shape[1]}x{out.shape[0]})")
    return 0
