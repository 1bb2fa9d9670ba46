"""``funcmem edit``'s steps: the instruction is cleaned, any image size comes back at its size, the
work is bounded by the tile limit (a coarser scale, or a refusal that names the limit), the models
see fixed-size chunks, and the full-size image is blended in strips, equal to a whole-image resize."""

from argparse import Namespace
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from funcmem.cli import UsageError
from funcmem.editing import apply
from funcmem.editing.apply import TooManyTiles, blend, edit_array, edit_image, tile_grid, to_tiles
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
    for shape in [(3, 1, 1), (3, 1, 60), (3, 37, 5)]:
        out = edit_image(loaded, torch.full(shape, 0.5), " make\x00 it\nbrighter\x1b ")
        assert out.shape == shape
        torch.testing.assert_close(out, torch.full(shape, 0.6))
    assert set(loaded.text_encoder.seen) == {"make it brighter"}
    for bad in ("", "\n\t \x00", "x" * 5000):
        with pytest.raises(ValueError, match="empty|characters long"):
            edit_image(loaded, torch.zeros(3, 4, 4), bad)


@pytest.mark.parametrize("h, w", [(45, 70), (300, 451), (20, 33), (32, 32), (1000, 700), (129, 500), (9, 9)])
def test_tile_grid_is_fit_scale_when_the_tiles_fit(h, w):
    scaled = fit_scale(torch.zeros(3, h, w), 32)
    gh, gw, sh, sw = tile_grid(h, w, 32, max_tiles=10**6)
    assert (sh, sw) == tuple(scaled.shape[-2:]) and (gh, gw) == (-(-sh // 32), -(-sw // 32))


def test_tile_grid_shrinks_a_large_image_to_the_limit_and_refuses_an_elongated_one():
    assert tile_grid(300, 451, 32, 64)[:2] == (4, 6)  # 24 tiles: the usual scale
    gh, gw, h, w = tile_grid(300, 451, 32, max_tiles=8)  # coarser, as fine as 8 tiles allow
    assert gh * gw <= 8 and min(h, w) >= 32 and gh * gw > 2 and abs(w / h - 451 / 300) < 0.05
    assert tile_grid(400, 40000, 32, max_tiles=100)[:2] == (1, 100)  # ratio 100 fits in 100 tiles, short side 32
    with pytest.raises(TooManyTiles, match=r"40000x400 \(side ratio 100:1\): it needs 100 tiles of 32 px even at "
                                           r"the smallest scale; the limit is 64 tiles"):
        tile_grid(400, 40000, 32, max_tiles=64)


def test_to_tiles_of_uint8_matches_float_to_rounding_and_covers_the_image():
    rng = torch.Generator().manual_seed(0)
    image = torch.rand(300, 451, 3, generator=rng)
    tiles, grid = to_tiles(image, 32)
    assert tiles.shape == (24, 3, 32, 32) and grid == (4, 6, 128, 192)
    u8 = (image * 255).round().to(torch.uint8)
    tiles8, grid8 = to_tiles(u8.numpy(), 32)  # a numpy array works too
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
    image = np.full((40, 480, 3), 128, np.uint8)  # short side 40 -> 32: 4 x 48 tiles of 8 px
    out = edit_array(loaded, image, "brighter", max_tiles=240, chunk=7)
    batches = loaded.methods["functional_memory"].batches
    assert sum(batches) > 7 and max(batches) == 7 and out.shape == (40, 480, 3) and out.dtype == torch.uint8
    assert int(out.min()) == int(out.max()) == 128 + 26  # + 0.1, rounded: every pixel, whatever the chunk
    assert edit_array(loaded, image, "brighter", max_tiles=16).shape == (40, 480, 3)  # coarser: 1 x 12 tiles
    with pytest.raises(TooManyTiles, match="side ratio 12:1.*the limit is 8 tiles"):
        edit_array(loaded, image, "brighter", max_tiles=8)


def test_edit_command_refuses_its_input_as_output_and_an_elongated_image(tmp_path, monkeypatch):
    photo = tmp_path / "wide.png"
    Image.new("RGB", (4000, 40), (90, 120, 200)).save(photo)  # a 100:1 strip, a few kB of PNG
    loaded = []
    monkeypatch.setattr(apply, "load_run", lambda run: loaded.append(run) or fake_run(size=8))
    monkeypatch.setattr(apply, "tile_size", lambda run: 8)
    args = Namespace(run="r", image=str(photo), instruction="brighter", output=str(photo), method="functional_memory",
                     max_tiles=64, chunk=16)
    with pytest.raises(UsageError, match="is the input image"):
        apply.run_cli(args)
    args.output = str(tmp_path / "out.png")
    with pytest.raises(TooManyTiles, match="the limit is 64 tiles"):
        apply.run_cli(args)
    assert loaded == []  # refused from the header, before the run was loaded (or the image decoded)
    args.max_tiles = 100
    assert apply.run_cli(args) == 0
    out = np.asarray(Image.open(args.output))
    assert out.shape == (40, 4000, 3) and np.abs(out.astype(int) - [90 + 26, 120 + 26, 200 + 26]).max() <= 1
