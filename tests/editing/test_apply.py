"""``funcmem edit``'s steps: the instruction is cleaned, any image size comes back at its size, the
work is bounded by the tile limit (a coarser scale, or a refusal that names the limit), the models
see fixed-size chunks, overlapping tiles' edits are cross-faded (weights summing to 1, no seam where
side-by-side tiles jump), an edit that changes nothing returns the input exactly, and the full-size
image is blended in strips, equal to a whole-image resize."""

from argparse import Namespace
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from funcmem.cli import UsageError
from funcmem.editing import apply
from funcmem.editing.apply import (TooManyTiles, _fold, blend, blend_weights, edit_array, edit_image, seam_score,
                                   stitch, tile_grid, to_tiles)
from funcmem.editing.data import fit_scale


class Text:
    def __init__(self):
        self.seen = []

    def encode(self, texts, max_tokens):
        self.seen.extend(texts)
        return torch.zeros(len(texts), max_tokens, 384), torch.ones(len(texts), max_tokens, dtype=torch.bool)


class Encoder:
    def raw(self, tiles, instructions):
        return {}


class Brighter:
    def __init__(self):
        self.batches = []

    def predict(self, batch):
        self.batches.append(len(batch["inputs"]))
        return batch["inputs"] + 0.1


def fake_run(size=8):
    return NS(size=size, text_encoder=Text(), editor=NS(config=NS(max_text_tokens=4)), encoder=Encoder(),
              methods={"functional_memory": Brighter()}, base_text=None)


def test_edit_image_cleans_the_instruction_and_takes_any_image_size():
    loaded = fake_run()
    for shape in [(3, 1, 1), (3, 1, 30), (3, 37, 5)]:
        out = edit_image(loaded, torch.full(shape, 0.5), " make\x00 it\nbrighter\x1b ")
        assert out.shape == shape
        torch.testing.assert_close(out, torch.full(shape, 0.6))
    assert set(loaded.text_encoder.seen) == {"make it brighter"}
    for bad in ("", "\n\t \x00", "x" * 5000):
        with pytest.raises(ValueError, match="empty|characters long"):
            edit_image(loaded, torch.zeros(3, 4, 4), bad)


@pytest.mark.parametrize("h, w", [(45, 70), (300, 451), (20, 33), (32, 32), (1000, 700), (129, 500), (9, 9)])
@pytest.mark.parametrize("stride", [32, 16])
def test_tile_grid_is_fit_scale_when_the_tiles_fit(h, w, stride):
    scaled = fit_scale(torch.zeros(3, h, w), 32)
    gh, gw, sh, sw, size, step = tile_grid(h, w, 32, max_tiles=10**6, stride=stride)
    assert (sh, sw) == tuple(scaled.shape[-2:]) and (size, step) == (32, stride)
    assert (gh, gw) == (-(-(sh - 32) // stride) + 1, -(-(sw - 32) // stride) + 1)
    assert (gh - 1) * stride < sh - 32 + stride and 32 + (gh - 1) * stride >= sh  # covered, no tile wholly in the padding


def test_tile_grid_shrinks_a_large_image_to_the_limit_and_refuses_an_elongated_one():
    assert tile_grid(300, 451, 32, 64, stride=32)[:4] == (4, 6, 128, 192)  # 24 side-by-side tiles: the usual scale
    assert tile_grid(300, 451, 32, 77)[:4] == (7, 11, 128, 192)  # overlapping by half: 77 tiles at that scale
    gh, gw, h, w, _, _ = tile_grid(300, 451, 32, 64)  # overlapping tiles count: a slightly coarser scale
    assert gh * gw <= 64 and 100 <= min(h, w) < 128 and abs(w / h - 451 / 300) < 0.05
    gh, gw, h, w, _, _ = tile_grid(300, 451, 32, max_tiles=8)  # coarser, as fine as 8 tiles allow
    assert gh * gw <= 8 and min(h, w) >= 32 and gh * gw > 2 and abs(w / h - 451 / 300) < 0.05
    assert tile_grid(400, 6400, 32, max_tiles=31)[:2] == (1, 31)  # ratio 16 fits in 31 tiles, short side 32
    with pytest.raises(TooManyTiles, match=r"40000x400 \(side ratio 100:1\): it needs 199 tiles of 32 px every 16 px "
                                           r"even at the smallest scale; the limit is 64 tiles \(crop it to a side "
                                           r"ratio of at most 32:1\)"):
        tile_grid(400, 40000, 32, max_tiles=64)
    with pytest.raises(ValueError, match="stride must be in"):
        tile_grid(300, 451, 32, stride=33)


def test_to_tiles_of_uint8_matches_float_to_rounding_and_covers_the_image():
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(300, 451, 3, generator=rng)
    tiles, grid = to_tiles(image, 32, max_tiles=77)
    assert tiles.shape == (77, 3, 32, 32) and grid == (7, 11, 128, 192, 32, 16)
    scaled = F.interpolate(image.permute(2, 0, 1)[None], size=(128, 192), mode="bilinear", antialias=True)[0]
    torch.testing.assert_close(tiles[12], scaled[:, 16:48, 16:48])  # row 1, col 1: from (16, 16)
    u8 = (image * 255).round().to(torch.uint8)
    tiles8, grid8 = to_tiles(u8.numpy(), 32, max_tiles=77)  # a numpy array works too
    assert grid8 == grid and (tiles8 - tiles).abs().max() < 2 / 255  # input rounding + resized-uint8 rounding


def test_blend_in_strips_equals_a_whole_image_resize(monkeypatch):
    monkeypatch.setattr(apply, "STRIP_BYTES", 4 * 3 * 70 * 7)  # 7 rows a strip: many strips, a ragged last one
    rng = torch.Generator().manual_seed(1)
    for (H, W), (h, w) in [((45, 70), (32, 53)), ((45, 70), (45, 70)), ((200, 70), (96, 33)), ((5, 70), (32, 448))]:
        image = torch.rand(H, W, 3, generator=rng)
        delta = torch.randn(3, h, w, generator=rng) * 0.1
        reference = (image.permute(2, 0, 1) + F.interpolate(delta[None], size=(H, W), mode="bilinear",
                                                            align_corners=False)[0]).clamp(0, 1)
        torch.testing.assert_close(blend(image, delta).permute(2, 0, 1), reference, atol=2e-6, rtol=0)
        u8 = (image * 255).round().to(torch.uint8)
        out8 = blend(u8, delta)
        assert out8.dtype == torch.uint8
        expected8 = ((u8.float().permute(2, 0, 1) / 255 + reference - image.permute(2, 0, 1)) * 255).round().clamp(0, 255)
        assert (out8.permute(2, 0, 1).float() - expected8).abs().max() <= 1


def test_edit_runs_the_model_in_chunks_so_memory_is_flat_in_image_size():
    loaded = fake_run(size=8)
    image = np.full((40, 480, 3), 128, np.uint8)  # short side 40 -> 32: 7 x 95 half-overlapping tiles of 8 px
    out = edit_array(loaded, image, "brighter", max_tiles=700, chunk=7)
    batches = loaded.methods["functional_memory"].batches
    assert sum(batches) == 665 and max(batches) == 7 and out.shape == (40, 480, 3) and out.dtype == torch.uint8
    assert int(out.min()) == int(out.max()) == 128 + 26  # + 0.1, rounded: every pixel, whatever the chunk


@pytest.mark.parametrize("max_tiles", [1, 5, 23, 24, 60, 200])
def test_the_tile_limit_counts_overlapping_tiles(max_tiles):
    loaded = fake_run(size=8)
    image = np.full((40, 480, 3), 128, np.uint8)  # side ratio 12: one row of 23 tiles at the smallest scale
    if max_tiles < 23:
        with pytest.raises(TooManyTiles, match=f"side ratio 12:1.*the limit is {max_tiles} tiles"):
            edit_array(loaded, image, "brighter", max_tiles=max_tiles)
        assert loaded.methods["functional_memory"].batches == []  # refused before any model call
        return
    out = edit_array(loaded, image, "brighter", max_tiles=max_tiles)
    assert 0.6 * max_tiles < sum(loaded.methods["functional_memory"].batches) <= max_tiles  # as fine as the limit allows
    assert out.shape == (40, 480, 3) and int(out.min()) == int(out.max()) == 128 + 26


class Unchanged:
    def predict(self, batch):
        return batch["inputs"].clone()


@pytest.mark.parametrize("shape", [(300, 451), (45, 70), (7, 200), (1000, 90)])
def test_an_edit_that_changes_nothing_returns_the_input_exactly(shape):
    """Every pixel of a photo's detail is kept where the edit is zero, at any scale the tiles take."""
    loaded = fake_run(size=8)
    loaded.methods = {"functional_memory": Unchanged()}
    rng = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (*shape, 3), generator=rng, dtype=torch.uint8)  # all detail, no smooth region
    assert torch.equal(edit_array(loaded, u8, "nothing", max_tiles=64), u8)
    image = torch.rand(*shape, 3, generator=rng)
    assert torch.equal(edit_array(loaded, image, "nothing", max_tiles=64), image)


@pytest.mark.parametrize("h, w, size, stride", [(128, 192, 32, 16), (45, 70, 8, 4), (33, 40, 8, 3), (32, 32, 32, 16),
                                                (40, 40, 8, 8), (9, 200, 8, 5), (57, 33, 16, 7)])
def test_blend_weights_sum_to_one_at_every_pixel(h, w, size, stride):
    grid = tile_grid(h, w, size, max_tiles=10**6, stride=stride)
    weights = blend_weights(grid)
    assert weights.shape == (grid.rows * grid.cols, 1, size, size) and weights.min() >= 0
    torch.testing.assert_close(_fold(weights, grid), torch.ones(1, *grid.padded), atol=1e-6, rtol=0)


def tile_constants(h: int, w: int, size: int, stride: int) -> tuple[Tensor, Tensor]:
    """A flat image's stitched edit when every tile's editor output adds its own constant in
    [-0.2, 0.2] (as tiles with different generated LoRAs might): (delta (3, h', w'), constants)."""
    tiles, grid = to_tiles(torch.full((h, w, 3), 0.5), size, 10**6, stride)
    constants = (torch.rand(len(tiles), generator=torch.Generator().manual_seed(0)) - 0.5) * 0.4
    return stitch(tiles + constants[:, None, None, None], tiles, grid), constants


def test_tiles_that_disagree_jump_side_by_side_and_fade_when_overlapped():
    side, _ = tile_constants(40, 64, 8, stride=8)  # the old tiling: tiles side by side
    assert seam_score(side, 8) > 1e3  # every step is at a tile border
    steps = torch.cat([side.diff(dim=1).abs().flatten(), side.diff(dim=2).abs().flatten()])
    assert steps.max() > 0.3  # a neighbour's constant differs by up to 0.37
    fade, constants = tile_constants(40, 64, 8, stride=4)
    assert seam_score(fade, 8) < 1.2 and seam_score(fade, 4) < 1.2  # the old borders and the new tile edges: no seam
    steps = torch.cat([fade.diff(dim=1).abs().flatten(), fade.diff(dim=2).abs().flatten()])
    assert steps.max() < 0.4 * (constants.max() - constants.min())  # the change is spread over half a tile
    assert constants.min() - 1e-6 <= fade.min() and fade.max() <= constants.max() + 1e-6  # a convex blend: no overshoot


def test_seam_score_compares_the_borders_with_the_other_lines():
    rng = torch.Generator().manual_seed(2)
    noise = torch.rand(3, 64, 96, generator=rng)
    assert 0.9 < seam_score(noise, 32) < 1.1 and 0.9 < seam_score(noise, 32, within=4) < 1.1
    patches = 0.1 * torch.rand(3, 16, 24, generator=rng).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4 px patches
    assert seam_score(patches, 32) > 3  # steps only on patch borders (1 line in 4), and the tile borders are patch borders
    assert 0.8 < seam_score(patches, 32, within=4) < 1.25  # compared with the other patch borders: no seam
    patches[:, :, 32:] += 0.5  # one of the three tile borders jumps
    assert seam_score(patches, 32, within=4) > 2
    assert np.isnan(seam_score(noise[:, :8, :8], 32))


def test_edit_command_refuses_its_input_as_output_and_an_elongated_image(tmp_path, monkeypatch):
    photo = tmp_path / "wide.png"
    Image.new("RGB", (4000, 40), (90, 120, 200)).save(photo)  # a 100:1 strip, a few kB of PNG
    loaded = []
    monkeypatch.setattr(apply, "load_run", lambda run: loaded.append(run) or fake_run(size=8))
    monkeypatch.setattr(apply, "tile_size", lambda run: 8)
    args = Namespace(run="r", image=str(photo), instruction="brighter", output=str(photo), method="functional_memory",
                     max_tiles=64, chunk=16)  # ratio 100 needs 199 half-overlapping tiles
    with pytest.raises(UsageError, match="is the input image"):
        apply.run_cli(args)
    args.output = str(tmp_path / "out.png")
    with pytest.raises(TooManyTiles, match="the limit is 64 tiles"):
        apply.run_cli(args)
    assert loaded == []  # refused from the header, before the run was loaded (or the image decoded)
    args.max_tiles = 199
    assert apply.run_cli(args) == 0
    out = np.asarray(Image.open(args.output))
    assert out.shape == (40, 4000, 3) and np.abs(out.astype(int) - [90 + 26, 120 + 26, 200 + 26]).max() <= 1
