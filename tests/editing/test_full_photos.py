"""The report's whole-photo figure: each edit goes through ``funcmem edit``'s path, a restoration edit
starts from its damaged photo, the photo is bounded, and every sentence follows from the numbers."""

from types import SimpleNamespace as NS

import pytest
import torch

from funcmem.editing.apply import Grid
from funcmem.editing.benchmark import full_photos
from funcmem.editing.benchmark.full_photos import edit_photo, figure_photo, panels, section
from funcmem.editing.ops import EDITS



class Text:
    def encode(self, texts, max_tokens):
        return torch.zeros(len(texts), max_tokens, 384), torch.ones(len(texts), max_tokens, dtype=torch.bool)


class Toward:
    """A method that moves every pixel a fraction of the way to 0.8."""

    def predict(self, batch):
        return batch["inputs"] + 0.5 * (0.8 - batch["inputs"])


def fake_run(method):
    return NS(size=8, text_encoder=Text(), editor=NS(config=NS(max_text_tokens=4, patch=4)),
              encoder=NS(raw=lambda tiles, texts: {}), methods={"functional_memory": method}, base_text=None)


def photo(h=40, w=60):
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("edit", ["brighten", "restore", "tint"])
def test_each_edit_is_scored_against_its_exact_target_on_the_whole_photo(edit):
    image = photo()
    row = edit_photo(fake_run(Toward()), image, edit)
    assert row["instruction"] == EDITS[edit].example() and row["after"].shape == image.shape
    assert row["damaged"] == (edit == "restore") and torch.equal(row["before"], image) == (edit != "restore")
    value = "red" if edit == "tint" else None
    _, target = EDITS[edit].apply(image, value, torch.Generator().manual_seed(0))
    mse = lambda x: float((x.clamp(0, 1) - target).pow(2).mean())
    assert row["psnr_before"] == pytest.approx(-10 * torch.log10(torch.tensor(mse(row["before"]))).item(), abs=1e-3)
    assert row["psnr_after"] == pytest.approx(-10 * torch.log10(torch.tensor(mse(row["after"]))).item(), abs=1e-3)
    assert row["grid"].stride == 4 and row["seam"] < 1.2  # one smooth edit: no seam at the tile borders


def test_the_figure_photo_is_bounded_and_read_from_the_runs_folder(tmp_path):
    from PIL import Image

    Image.new("RGB", (1000, 500), (10, 200, 30)).save(tmp_path / "wide.png")
    Image.new("RGB", (50, 40), (10, 200, 30)).save(tmp_path / "small.png")
    assert figure_photo({"images": str(tmp_path)}, "wide.png").shape == (3, 192, full_photos.MAX_SIDE)
    assert figure_photo({"images": str(tmp_path)}, "small.png").shape == (3, 40, 50)  # small photos as they are


def rows(gains, seams=None):
    seams = seams or [1.0] * len(gains)
    grid = Grid(6, 10, 112, 168, 32, 16)
    return [{"edit": f"e{i}", "instruction": f"do {i}", "psnr_before": 20.0, "psnr_after": 20.0 + g, "seam": s,
             "patch": 4, "grid": grid, "damaged": False, "before": None, "after": None}
            for i, (g, s) in enumerate(zip(gains, seams))]


def test_the_section_says_what_its_numbers_show():
    text = "\n".join(section("cat", photo(300, 451), rows([3.0, 5.0, -1.0], [0.9, 1.3, 1.0]), 12.3))
    assert "`cat` (451x300 px)" in text and "6x10 tiles of 32 px, one every 16 px, at 168x112 px" in text
    assert "median gain is +3.0 dB" in text and "2 of 3 results are closer" in text and "(not e2:" in text
    assert "median 1.00, largest 1.30 (e1)" in text and "took 12.3 s" in text
    assert "| e2 | do 2 | 20.00 | 19.00 | 1.00 |" in text
    text = "\n".join(section("cat", photo(), rows([1.0, 2.0], [float("nan")] * 2), 1.0))
    assert "3 of" not in text and "2 of 2 results are closer to their target than their input was." in text
    assert "(not" not in text and "no tile border" in text and "Seam score" not in text


def test_panels_show_the_photo_once_and_a_damaged_input_before_its_restoration():
    image = photo()
    rs = rows([1.0, 2.0])
    rs[1]["damaged"] = True
    rs[1]["before"] = image * 0.5
    items = panels(image, rs)
    assert [c.split(":")[0] for c, _ in items] == ["before", "e0", "before e1", "e1"]
    assert items[0][1] is image and items[2][1] is rs[1]["before"]
