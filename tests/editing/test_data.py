"""Photo data: loads offline from wheels, splits by photo, crops, builds deterministic examples."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from funcmem.editing.data import (
    PHOTO_SOURCES, Photo, fit_scale, load_folder, load_photos, manifest, random_crops, split_photos,
)
from funcmem.editing.ops import EDITS
from funcmem.editing.tasks import make_examples


@pytest.fixture(scope="module")
def photos():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every listed photo must load, without a skip warning
        return load_photos()


def fake_photos(n, size=(40, 60)):
    return [Photo(f"p{i}", "test", "none", torch.rand(3, *size, generator=torch.Generator().manual_seed(i)))
            for i in range(n)]


# ---------------------------------------------------------------- loading


def test_every_listed_photo_loads_offline_as_rgb_in_unit_range(photos):
    assert [p.name for p in photos] == list(PHOTO_SOURCES)
    assert len(photos) >= 16
    for p in photos:
        assert p.image.dtype == torch.float32 and p.image.dim() == 3 and p.image.shape[0] == 3
        assert 0 <= p.image.min() and p.image.max() <= 1 and p.image.std() > 0.02, p.name
        assert p.licence and p.source_package in ("skimage", "sklearn", "matplotlib", "sporco")


def test_manifest_records_name_package_licence_and_size(photos):
    rows = manifest(photos)
    assert rows[0] == {"name": "astronaut", "source_package": "skimage", "licence": photos[0].licence,
                       "size": [512, 512]}
    assert {r["name"]: r["licence"] for r in rows}["china"].startswith("CC-BY 2.0")


def test_load_photos_subset_and_unknown_name():
    assert [p.name for p in load_photos(["chelsea", "tulips"])] == ["chelsea", "tulips"]
    with pytest.raises(ValueError, match="unknown photos.*eagle"):
        load_photos(["chelsea", "eagle"])


def test_load_folder_reads_png_and_jpeg_as_rgb(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(np.full((25, 15), 128, np.uint8), "L").save(tmp_path / "b.JPG")
    (tmp_path / "notes.txt").write_text("not an image")
    a, b = load_folder(tmp_path)
    assert (a.name, b.name) == ("a.png", "b.JPG")
    assert a.image.shape == (3, 20, 30) and torch.allclose(a.image[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    assert b.image.shape == (3, 25, 15) and abs(float(b.image.mean()) - 128 / 255) < 0.02


def test_load_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no images.*" + tmp_path.name):
        load_folder(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_folder(tmp_path)
    with pytest.raises(NotADirectoryError):
        load_folder(tmp_path / "missing")


# ---------------------------------------------------------------- split


def test_split_is_by_photo_deterministic_and_non_empty(photos):
    train, test = split_photos(photos, test_fraction=0.25, seed=0)
    names_train, names_test = {p.name for p in train}, {p.name for p in test}
    assert not names_train & names_test
    assert names_train | names_test == {p.name for p in photos}
    assert len(test) == 4
    again = split_photos(photos, test_fraction=0.25, seed=0)
    assert [p.name for p in again[1]] == [p.name for p in test]
    assert any({p.name for p in split_photos(photos, seed=s)[1]} != names_test for s in range(1, 5))


def test_split_keeps_both_sides_non_empty_and_rejects_duplicates():
    for frac in (0.0, 0.5, 1.0):
        train, test = split_photos(fake_photos(2), test_fraction=frac)
        assert len(train) == 1 and len(test) == 1
    with pytest.raises(ValueError, match="unique"):
        split_photos(fake_photos(2) + fake_photos(1))


# ---------------------------------------------------------------- crops


def test_random_crops_shape_determinism_and_scaling():
    small, large = fake_photos(1, (20, 30))[0], fake_photos(1, (600, 900))[0]
    crops = random_crops(small, 5, 32, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 32, 32)  # upscaled first: short side 20 -> 32
    assert torch.equal(crops, random_crops(small, 5, 32, torch.Generator().manual_seed(0)))
    assert fit_scale(large.image, 32).shape == (3, 128, 192)  # short side capped at 4 * size
    mid = torch.rand(3, 64, 80)
    assert fit_scale(mid, 32) is mid  # already in range: untouched
    assert random_crops(large, 3, 32, torch.Generator()).shape == (3, 3, 32, 32)


# ---------------------------------------------------------------- examples


def test_make_examples_is_deterministic_balanced_and_shaped():
    photos = fake_photos(3)
    ex = make_examples(photos, None, n=52, size=16, split="train", seed=7)
    assert ex["inputs"].shape == ex["targets"].shape == (52, 3, 16, 16)
    assert ex["edit_ids"].dtype == torch.long and len(ex["instructions"]) == 52 == len(ex["instances"])
    counts = torch.bincount(ex["edit_ids"], minlength=len(EDITS))
    assert counts.max() - counts.min() <= 1
    again = make_examples(photos, None, n=52, size=16, split="train", seed=7)
    for key in ("inputs", "targets", "edit_ids"):
        assert torch.equal(ex[key], again[key]), key
    assert ex["instructions"] == again["instructions"]
    other = make_examples(photos, None, n=52, size=16, split="train", seed=8)
    assert not torch.equal(ex["inputs"], other["inputs"])
    with pytest.raises(ValueError, match="unknown edits"):
        make_examples(photos, ["blur", "sepia"], n=4, size=16)


def test_make_examples_targets_follow_edit_and_instruction():
    names = ["brighten", "denoise"]  # edit_ids index this list
    ex = make_examples(fake_photos(2), names, n=20, size=16, split="test", seed=0)
    for i in range(20):
        edit = EDITS[names[int(ex["edit_ids"][i])]]
        inst = ex["instances"][i]
        assert inst.edits == (edit.name,)
        assert any(ex["instructions"][i].startswith(p) for p in edit.test_phrasings), ex["instructions"][i]
        if edit.name == "brighten":  # forward: target is the edit of the input at the stated value
            _, expected = edit.apply(ex["inputs"][i], inst.values[0])
            assert torch.allclose(ex["targets"][i], expected, atol=1e-6)
        else:  # restoration: input is damaged, no value stated
            assert inst.values == (None,) and not torch.equal(ex["inputs"][i], ex["targets"][i])
