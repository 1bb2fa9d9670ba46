"""Examples with their frozen features: the photo split, the benchmark's task splits
(``editing.tasks``), and ``EditSet`` (what every method trains and is evaluated on)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditions import TextEncoder
from ..data import load_folder, load_photos, split_photos
from ..editor import EditorConfig
from ..methods import pooled_condition
from ..pretrain import PHOTOS as PRETRAIN_PHOTOS
from ..tasks import EDIT_NAMES, EVAL_SPLITS, make_task_examples


class EditSet:
    """Examples with their frozen features, on one device; ``batch(idx)`` -> a method's batch dict.

    ``second_ids`` (n,): the second edit of a composition, -1 for a single edit (all -1 when the
    examples have none); ``groups`` (n str): what a sample's score is reported under, its edit's
    name or "first + second" for a composition.
    """

    def __init__(self, examples: dict, text_states: Tensor, text_mask: Tensor, raw: dict[str, dict[str, Tensor]]):
        self.inputs, self.targets = examples["inputs"], examples["targets"]
        self.instructions, self.edit_ids = examples["instructions"], examples["edit_ids"]
        self.second_ids = examples.get("second_ids", torch.full_like(self.edit_ids, -1))
        self.instances = examples.get("instances")
        self.groups = [EDIT_NAMES[a] if b < 0 else f"{EDIT_NAMES[a]} + {EDIT_NAMES[b]}"
                       for a, b in zip(self.edit_ids.tolist(), self.second_ids.tolist())]
        self.text_states, self.text_mask = text_states, text_mask
        self.raw = raw  # condition name -> streams
        self.pooled = {name: pooled_condition(streams) for name, streams in raw.items()}

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: Tensor, condition: str) -> dict:
        return {"inputs": self.inputs[idx], "targets": self.targets[idx], "text_states": self.text_states[idx],
                "text_mask": self.text_mask[idx], "edit_ids": self.edit_ids[idx], "second_ids": self.second_ids[idx],
                "raw": {k: v[idx] for k, v in self.raw[condition].items()}, "pooled": self.pooled[condition][idx]}

    def head(self, n: int) -> "EditSet":
        """The first ``n`` examples (the training set's view the size of the test split)."""
        keep = slice(0, min(n, len(self)))
        examples = {"inputs": self.inputs[keep], "targets": self.targets[keep],
                    "instructions": self.instructions[keep], "edit_ids": self.edit_ids[keep],
                    "second_ids": self.second_ids[keep],
                    "instances": None if self.instances is None else self.instances[keep]}
        return EditSet(examples, self.text_states[keep], self.text_mask[keep],
                       {c: {k: v[keep] for k, v in streams.items()} for c, streams in self.raw.items()})

    def chunks(self, condition: str, size: int = 128):
        for start in range(0, len(self), size):
            yield self.batch(torch.arange(start, min(start + size, len(self))), condition)


def encode_raw(encoder, images: Tensor, instructions: list[str], chunk: int = 128) -> dict[str, Tensor]:
    """Raw condition streams for a whole set, computed in chunks."""
    parts = [encoder.raw(images[i:i + chunk], instructions[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build_set(examples: dict, text_encoder: TextEncoder, encoders: dict, editor_cfg: EditorConfig, device,
              base_text: str | None = None) -> EditSet:
    """Frozen features of examples: the editor's text states (of ``base_text`` for every sample when
    given, else of each instruction) and each condition encoder's raw streams (always the instruction)."""
    texts = [base_text] * len(examples["instructions"]) if base_text is not None else examples["instructions"]
    states, mask = text_encoder.encode(texts, editor_cfg.max_text_tokens)
    raw = {name: encode_raw(enc, examples["inputs"], examples["instructions"]) for name, enc in encoders.items()}
    to = lambda t: t.to(device)
    examples = {**examples, "inputs": to(examples["inputs"]), "targets": to(examples["targets"]),
                "edit_ids": to(examples["edit_ids"]),
                **({"second_ids": to(examples["second_ids"])} if "second_ids" in examples else {})}
    return EditSet(examples, to(states), to(mask), {n: {k: to(v) for k, v in r.items()} for n, r in raw.items()})


def photo_split(images: str | None, seed: int):
    """Train and test photos; with the bundled photos, the base editor's pretraining photos stay in train."""
    if images:
        return split_photos(load_folder(images), seed=seed)
    photos = load_photos()
    held = [p for p in photos if p.name in PRETRAIN_PHOTOS]
    rest = [p for p in photos if p.name not in PRETRAIN_PHOTOS]
    train, test = split_photos(rest, test_fraction=0.25 * len(photos) / max(1, len(rest)), seed=seed)
    return held + train, test


def task_examples(cfg, train_photos, test_photos) -> dict[str, dict]:
    """The benchmark's examples: "train" on the train photos, and every split of ``tasks.EVAL_SPLITS``
    on the test photos (``cfg.test_examples`` each, their own seeds)."""
    out = {"train": make_task_examples(train_photos, "train", cfg.train_examples, cfg.size, cfg.data_seed)}
    for i, split in enumerate(EVAL_SPLITS):
        out[split] = make_task_examples(test_photos, split, cfg.test_examples, cfg.size, cfg.data_seed + 1 + i)
    return out
