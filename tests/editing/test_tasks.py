"""Task instances: values and compositions written in the instruction, exact targets, and splits
disjoint by photo, phrasing, value and pair."""

import re

import pytest
import torch

from funcmem.editing import tasks
from funcmem.editing.data import Photo, split_photos
from funcmem.editing.ops import EDITS, FAMILY, LEGACY, STRENGTH_WORDS, colour_rgb, write_colour
from funcmem.editing.tasks import (
    ALL_PAIRS, EDIT_NAMES, EVAL_SPLITS, HELD_OUT_PAIRS, SPLITS, TRAIN_PAIRS, Instance, apply_instances,
    make_task_examples, sample_instance,
)


def fake_photos(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [Photo(f"p{i}", "test", "none", torch.rand(3, 40, 48, generator=g)) for i in range(n)]


def instances(split, n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [sample_instance(split, g) for _ in range(n)]


def phrasing_of(text, edit, held_out):
    """Which phrasing (template) of the edit the clause starts with, or None."""
    pool = EDITS[edit].test_phrasings if held_out else EDITS[edit].train_phrasings
    for p in pool:
        pattern = re.escape(p).replace(re.escape("{colour}"), r"(?:[a-z]+|rgb\(\d+, \d+, \d+\))")
        if re.match(pattern, text):
            return p
    return None


# ---------------------------------------------------------------- the splits


def test_pairs_are_split_and_every_edit_still_composes_in_training():
    held = {frozenset(p) for p in HELD_OUT_PAIRS}
    train = {frozenset(p) for p in TRAIN_PAIRS}
    assert held and not held & train and held | train == {frozenset(p) for p in ALL_PAIRS}
    for name in tasks.COMPOSABLE:
        assert sum(name in p for p in TRAIN_PAIRS) >= 4, name
    assert ("warmer", "darken") in HELD_OUT_PAIRS  # "warmer and a bit darker" is never seen in training
    assert all(EDITS[a].inverse != b for a, b in ALL_PAIRS)
    assert not {n for p in ALL_PAIRS for n in p} & set(LEGACY)


def test_splits_draw_from_the_family_only():
    names = {n for split in SPLITS for i in instances(split, 300) for n in i.edits}
    assert names == set(FAMILY) and EDIT_NAMES[: len(FAMILY)] == list(FAMILY)


def test_compositions_use_their_split_s_pairs_only():
    seen = {frozenset(i.edits) for i in instances("train") if len(i.edits) == 2}
    assert seen and not seen & {frozenset(p) for p in HELD_OUT_PAIRS}
    held = instances("held_out_compositions", 200)
    assert all(len(i.edits) == 2 and frozenset(i.edits) in {frozenset(p) for p in HELD_OUT_PAIRS} for i in held)
    assert all(len(i.edits) == 1 for split in ("seen_wording", "held_out_wording", "held_out_values")
               for i in instances(split, 100))
    share = sum(len(i.edits) == 2 for i in instances("train", 2000)) / 2000
    assert abs(share - SPLITS["train"].compositions) < 0.04


def test_values_are_split_between_and_beside():
    for name, edit in EDITS.items():
        v = edit.values
        if v is None:
            continue
        assert not set(v.train) & set(v.held_out()), name
        if v.unit != "colour":
            assert min(v.train) < min(v.between) and max(v.between) < max(v.train), name  # between: inside
            assert all(b < min(v.train) or b > max(v.train) for b in v.beside), name  # beside: outside
    for split, allowed in (("train", "train"), ("held_out_values", "held_out")):
        for inst in instances(split):
            for name, value, kind in zip(inst.edits, inst.values, inst.kinds):
                spec = EDITS[name].values
                if kind in ("train", "between", "beside"):
                    pool = spec.train if allowed == "train" else spec.held_out()
                    assert value in pool, (split, inst)
                    assert (kind == "train") == (allowed == "train")
                    assert spec.write(value) in inst.text
                else:
                    assert allowed == "train" and kind in ("default", "word", "none"), (split, inst)
    kinds = {i.kinds[0] for i in instances("held_out_values")}
    assert kinds == {"between", "beside"}


def test_phrasings_follow_the_split():
    for split in ("train", "seen_wording", "held_out_wording", "held_out_values", "held_out_compositions"):
        held_out = SPLITS[split].phrasings == "held_out"
        for inst in instances(split, 200):
            starts = [0] + [m.end() for m in re.finditer(" and ", inst.text)]  # where a clause may begin
            for name in inst.edits:
                assert any(phrasing_of(inst.text[s:], name, held_out) for s in starts), (split, inst.text)
                assert not any(phrasing_of(inst.text[s:], name, not held_out) for s in starts), (split, inst.text)


def test_held_out_values_cover_the_value_edits_evenly():
    ex = make_task_examples(fake_photos(), "held_out_values", n=44, size=16, seed=0)
    counts = torch.bincount(ex["edit_ids"], minlength=len(EDIT_NAMES))
    forward = [EDIT_NAMES.index(n) for n in FAMILY if EDITS[n].has_strength]
    assert counts[forward].min() == 4 and counts.sum() == 44  # 11 forward edits, 4 each
    assert (ex["second_ids"] == -1).all()


def test_examples_are_split_by_photo():
    train_photos, test_photos = split_photos(fake_photos(8), seed=0)
    tr = make_task_examples(train_photos, "train", n=64, size=16, seed=0)
    for split in EVAL_SPLITS:
        te = make_task_examples(test_photos, split, n=32, size=16, seed=1)
        assert not set(tr["photos"]) & set(te["photos"]) and set(te["photos"]) <= {p.name for p in test_photos}


# ---------------------------------------------------------------- exact targets


def test_a_composition_applies_both_edits_in_the_order_written():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    inst = Instance(("warmer", "darken"), (40.0, 12.5), ("train", "word"), "make it warmer by 40% and darken it slightly")
    flipped = Instance(("darken", "warmer"), (12.5, 40.0), ("word", "train"), "darken it slightly and make it warmer by 40%")
    inputs, targets = apply_instances(x, [inst, flipped], g)
    _, warm = EDITS["warmer"].apply(x, 40.0)
    _, expected = EDITS["darken"].apply(warm, 12.5)
    assert torch.equal(inputs, x)
    assert torch.allclose(targets[0], expected[0], atol=1e-6)
    _, dark = EDITS["darken"].apply(x, 12.5)
    _, expected = EDITS["warmer"].apply(dark, 40.0)
    assert torch.allclose(targets[1], expected[1], atol=1e-6)


def test_examples_targets_are_the_instructions_edits_at_their_values():
    ex = make_task_examples(fake_photos(), "train", n=80, size=16, seed=3)
    for i, inst in enumerate(ex["instances"]):
        if EDITS[inst.edits[0]].values is None:  # restoration: damaged input, clean target
            assert len(inst.edits) == 1 and not torch.equal(ex["inputs"][i], ex["targets"][i])
            continue
        y = ex["inputs"][i]
        for name, value in zip(inst.edits, inst.values):
            _, y = EDITS[name].apply(y, value)
        assert torch.allclose(ex["targets"][i], y, atol=1e-5), inst.text
        if inst.kinds[0] == "word":
            word = "slightly" if "slightly" in inst.text else "strongly"
            assert inst.values[0] == EDITS[inst.edits[0]].values.default * STRENGTH_WORDS[word]


def test_examples_are_deterministic():
    a = make_task_examples(fake_photos(), "held_out_compositions", n=24, size=16, seed=5)
    b = make_task_examples(fake_photos(), "held_out_compositions", n=24, size=16, seed=5)
    assert a["instructions"] == b["instructions"] and torch.equal(a["targets"], b["targets"])
    c = make_task_examples(fake_photos(), "held_out_compositions", n=24, size=16, seed=6)
    assert a["instructions"] != c["instructions"]


def test_tint_names_its_colour():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, 8, 8), 0.5)
    for colour in ("red", (0, 128, 255)):
        _, y = EDITS["tint"].apply(x, colour)
        rgb = torch.tensor(colour_rgb(colour))
        assert torch.allclose(y[0, :, 0, 0], 0.6 * 0.5 + 0.4 * rgb, atol=1e-6)
    assert write_colour((0, 128, 255)) == "rgb(0, 128, 255)"
    with pytest.raises(ValueError, match="colour"):
        EDITS["tint"].apply(x, None)
    texts = [sample_instance("seen_wording", g, edits=["tint"]).text for _ in range(50)]
    assert any("rgb(" in t for t in texts) and any("rgb(" not in t for t in texts)


def test_bad_split_is_named():
    with pytest.raises(ValueError, match="unknown split 'val'"):
        make_task_examples(fake_photos(), "val", n=4, size=16)
