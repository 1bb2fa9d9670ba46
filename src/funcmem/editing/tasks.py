"""Task instances of the editing family: an instruction names one edit, or two in a row, with the
value each should take; the splits hold out wording, values and pairs.

    sample_instance(split, rng)                       -> Instance(edits, values, kinds, text)
    apply_instances(crops, instances, rng)            -> inputs, targets      (B, 3, S, S)
    make_task_examples(photos, split, n, size, seed)  -> dict of examples
    make_examples(photos, edits, n, size, "train"/"test", seed) -> single edits, local edit ids

An instruction is a phrasing (``funcmem.editing.phrasings``) with a value: none (the edit's
default), a strength word ("slightly", "strongly") or a number ("by 40%", "by 2 px"); tint names a
colour ("tint it teal", "give it a rgb(255, 128, 0) tint"). A composition joins two forward edits
of different pairs with "and" and applies them in the order written:
"make it warmer by 40% and darken the photo slightly" -> darken(warmer(x, 40), 25).

| split                 | phrasings | values                         | instances                     |
| --------------------- | --------- | ------------------------------ | ----------------------------- |
| train                 | training  | training (or default / word)   | single edits + training pairs |
| seen_wording          | training  | training (or default / word)   | single edits                  |
| held_out_wording      | held-out  | training (or default / word)   | single edits                  |
| held_out_values       | training  | held-out: between and beside   | single edits that name values |
| held_out_compositions | training  | training (or default / word)   | held-out pairs                |

Photos are split separately (``funcmem.editing.data.split_photos``): evaluation splits use test
photos. Training and held-out values, phrasings and pairs are disjoint (tests check it).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

import torch
from torch import Tensor

from .data import Photo, random_crops
from .ops import COLOURS, EDITS, FAMILY, INVERSE_PAIRS, STRENGTH_WORDS, Edit

EDIT_NAMES = list(EDITS)  # edit ids index this list: the family's edits first (ids 0 .. len(FAMILY) - 1)

COMPOSABLE = tuple(name for name in FAMILY if EDITS[name].has_strength)  # forward edits
_INVERSE = {frozenset(p) for p in INVERSE_PAIRS}
ALL_PAIRS = tuple(p for p in combinations(COMPOSABLE, 2) if frozenset(p) not in _INVERSE)
HELD_OUT_PAIRS = (("warmer", "darken"), ("cooler", "brighten"), ("contrast_up", "tint"), ("saturate", "warmer"),
                  ("add_noise", "contrast_down"), ("age", "saturate"), ("brighten", "contrast_down"), ("tint", "desaturate"))
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if frozenset(p) not in {frozenset(q) for q in HELD_OUT_PAIRS})

VALUE_FORMS = {"default": 0.25, "word": 0.25, "number": 0.5}  # how training instructions state the value


@dataclass(frozen=True)
class Split:
    """What one split's instructions draw from.

    Args:
        phrasings: "train" or "held_out" phrasings.
        values: "train" (the default, a strength word or a training value) or "held_out"
            (always a held-out value, between or beside the training values).
        compositions: share of instances that name two edits.
        pairs: "train" or "held_out": the pairs compositions draw from.
    """

    phrasings: str
    values: str
    compositions: float
    pairs: str = "train"

    def single_edits(self) -> list[str]:
        """The edits single instances draw from: the family's, or those of them that name values."""
        if self.values == "held_out":
            return [n for n in FAMILY if EDITS[n].has_strength]
        return list(FAMILY)


SPLITS: dict[str, Split] = {
    "train": Split("train", "train", 0.25),
    "seen_wording": Split("train", "train", 0.0),
    "held_out_wording": Split("held_out", "train", 0.0),
    "held_out_values": Split("train", "held_out", 0.0),
    "held_out_compositions": Split("train", "train", 1.0, "held_out"),
}
EVAL_SPLITS = ("seen_wording", "held_out_wording", "held_out_values", "held_out_compositions")


@dataclass(frozen=True)
class Instance:
    """One task instance.

    Args:
        edits: one or two edit names, in the order they apply.
        values: per edit, the value its op takes (a number in the edit's unit, a colour name or
            rgb triple, or None: the default / a restoration edit).
        kinds: per edit, how the value was stated: "default", "word", "train", "between",
            "beside" or "none" (restoration edits).
        text: the instruction.
    """

    edits: tuple[str, ...]
    values: tuple
    kinds: tuple[str, ...]
    text: str


def _pick(options: Sequence, g: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _clause(name: str, split: Split, g: torch.Generator) -> tuple[str, object, str]:
    """One edit's words: (text, value, kind)."""
    edit = EDITS[name]
    phrasing = _pick(edit.train_phrasings if split.phrasings == "train" else edit.test_phrasings, g)
    spec = edit.values
    if spec is None:
        return phrasing, None, "none"
    if split.values == "held_out":
        n_between = len(spec.between)
        k = int(torch.randint(len(spec.held_out()), (1,), generator=g))
        value, kind = spec.held_out()[k], ("between" if k < n_between else "beside")
    elif spec.unit == "colour":  # tint always names a colour
        value, kind = _pick(spec.train, g), "train"
    else:
        u = float(torch.rand((), generator=g))
        if u < VALUE_FORMS["default"]:
            return phrasing, spec.default, "default"
        if u < VALUE_FORMS["default"] + VALUE_FORMS["word"]:
            word = _pick(["slightly", "strongly"], g)
            return f"{phrasing} {word}", spec.default * STRENGTH_WORDS[word], "word"
        value, kind = _pick(spec.train, g), "train"
    if spec.unit == "colour":
        return phrasing.format(colour=spec.write(value)), value, kind
    return phrasing + spec.write(value), float(value), kind


def sample_instance(split: str | Split, g: torch.Generator, edits: Sequence[str] | None = None) -> Instance:
    """A random instance of a split (see ``SPLITS``): two edits with probability ``compositions``
    (a random pair of the split's pairs, in random order), else one of ``edits`` (default: the
    split's single edits)."""
    sp = SPLITS[split] if isinstance(split, str) else split
    if float(torch.rand((), generator=g)) < sp.compositions:
        pair = _pick(TRAIN_PAIRS if sp.pairs == "train" else HELD_OUT_PAIRS, g)
        names = pair if float(torch.rand((), generator=g)) < 0.5 else pair[::-1]
    else:
        names = (_pick(list(edits) if edits is not None else sp.single_edits(), g),)
    clauses = [_clause(n, sp, g) for n in names]
    return Instance(tuple(names), tuple(c[1] for c in clauses), tuple(c[2] for c in clauses),
                    " and ".join(c[0] for c in clauses))


def apply_instances(crops: Tensor, instances: Sequence[Instance], g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs and targets: each instance's edits applied in order (restoration edits damage the
    input instead). Samples sharing an edit are edited together.

    Shape:
        crops: (B, 3, S, S) clean images; inputs, targets: (B, 3, S, S).
    """
    if len(instances) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(instances)} instances")
    inputs, targets = crops.clone(), crops.clone()
    for step in range(2):
        for name in EDIT_NAMES:
            idx = [i for i, inst in enumerate(instances) if len(inst.edits) > step and inst.edits[step] == name]
            if not idx:
                continue
            edit, rows = EDITS[name], torch.tensor(idx)
            value = [instances[i].values[step] for i in idx]
            if edit.values is not None and edit.values.unit != "colour":
                value = torch.tensor(value, dtype=torch.float32)
            x_in, y = edit.apply(targets[rows], value, g)
            if step == 0:
                inputs[rows] = x_in
            targets[rows] = y
    return inputs, targets


def make_task_examples(photos, split: str, n: int = 256, size: int = 32, seed: int = 0,
                       edits: Sequence[str] | None = None) -> dict:
    """A deterministic set of examples of one split.

    Every example draws a photo uniformly and a random crop of it (``data.random_crops``) and an
    instance of ``split``; single-edit instances cycle through the edits so their counts differ by
    at most one. Pass the photos of the matching photo split.

    Args:
        photos: source photos (``data.Photo``).
        split: a key of ``SPLITS``.
        n: number of examples.
        size: crop side S.
        seed: everything (crops, instances, damage) follows from it.
        edits: restrict single-edit instances to these edits (default: the split's).
    Returns:
        dict with ``inputs``, ``targets`` (n, 3, S, S), ``instructions`` (n str), ``instances``
        (n ``Instance``), ``edit_ids`` (n,) long (the first edit, in ``EDIT_NAMES``),
        ``second_ids`` (n,) long (the second edit, -1 for single edits), ``photos`` (n photo names).
    """
    if not photos:
        raise ValueError("make_task_examples needs at least one photo")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {list(SPLITS)}")
    g = torch.Generator().manual_seed(seed)
    photo_ids = torch.randint(len(photos), (n,), generator=g)
    crops = torch.empty(n, 3, size, size)
    for p, photo in enumerate(photos):
        idx = (photo_ids == p).nonzero().flatten()
        if len(idx):
            crops[idx] = random_crops(photo, len(idx), size, g)
    singles = list(edits) if edits is not None else SPLITS[split].single_edits()
    order = [singles[i] for i in torch.randperm(len(singles), generator=g).tolist()]
    instances, k = [], 0
    for _ in range(n):
        inst = sample_instance(split, g, edits=[order[k % len(order)]])  # balanced singles
        k += len(inst.edits) == 1
        instances.append(inst)
    inputs, targets = apply_instances(crops, instances, g)
    first = torch.tensor([EDIT_NAMES.index(i.edits[0]) for i in instances])
    second = torch.tensor([EDIT_NAMES.index(i.edits[1]) if len(i.edits) > 1 else -1 for i in instances])
    return {"inputs": inputs, "targets": targets, "instructions": [i.text for i in instances],
            "instances": instances, "edit_ids": first, "second_ids": second,
            "photos": [photos[int(p)].name for p in photo_ids]}


def language_extra() -> dict[str, set[str]]:
    """Keywords an edit owns beyond its phrasings' words: tint owns every colour name and "rgb"
    (for ``phrasings.check_language``)."""
    return {"tint": set(COLOURS) | {"rgb"}}


def make_examples(photos: Sequence[Photo], edits: Sequence[str | Edit] | None = None, n: int = 256,
                  size: int = 32, split: str = "train", seed: int = 0) -> dict:
    """A deterministic set of single-edit examples (``tasks.make_task_examples`` of the split
    "seen_wording" for ``split="train"``, "held_out_wording" for ``split="test"``).

    Every example draws a photo uniformly and a random crop of it; edits are balanced (counts
    differ by at most one); each instruction comes from ``split``'s phrasing set and states the
    edit's default, a strength word or a training value. Pass the photos of the same split.

    Args:
        photos: source photos.
        edits: edit names or ``Edit``s; all of ``EDITS`` by default. ``edit_ids`` index this list.
        n: number of examples.
        size: crop side S.
        split: "train" or "test" phrasings.
        seed: everything (crops, edits, phrasings, values, damage) follows from it.
    Returns:
        dict with ``inputs`` (n, 3, S, S), ``targets`` (n, 3, S, S), ``instructions`` (list of n
        str), ``instances`` (n ``tasks.Instance``) and ``edit_ids`` (n,) long.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = [e.name if isinstance(e, Edit) else e for e in (list(EDITS) if edits is None else edits)]
    unknown = [e for e in names if e not in EDITS]
    if unknown:
        raise ValueError(f"unknown edits {unknown}; edits: {list(EDITS)}")
    ex = make_task_examples(photos, "seen_wording" if split == "train" else "held_out_wording", n, size, seed, names)
    local = torch.tensor([names.index(EDIT_NAMES[int(k)]) for k in ex["edit_ids"]], dtype=torch.long)
    return {"inputs": ex["inputs"], "targets": ex["targets"], "instructions": ex["instructions"],
            "instances": ex["instances"], "edit_ids": local}
