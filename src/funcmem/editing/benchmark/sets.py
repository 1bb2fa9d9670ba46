"""Examples with their frozen features: the photo split, and ``EditSet`` (what every method trains
and is evaluated on)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditions import TextEncoder
from ..data import load_folder, load_photos, split_photos
from ..editor import EditorConfig
from ..methods import pooled_condition
from ..pretrain import PHOTOS as PRETRAIN_PHOTOS


class EditSet:
    """Examples with their frozen features, on one device; ``batch(idx)`` -> a method's batch dict."""

    def __init__(self, examples: dict, text_states: Tensor, text_mask: Tensor, raw: dict[str, dict[str, Tensor]]):
        self.inputs, self.targets = examples["inputs"], examples["targets"]
        self.instructions, self.edit_ids = examples["instructions"], examples["edit_ids"]
        self.text_states, self.text_mask = text_states, text_mask
        self.raw = raw  # condition name -> streams
        self.pooled = {name: pooled_condition(streams) for name, streams in raw.items()}

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: Tensor, condition: str) -> dict:
        return {"inputs": self.inputs[idx], "targets": self.targets[idx], "text_states": self.text_states[idx],
                "text_mask": self.text_mask[idx], "edit_ids": self.edit_ids[idx],
                "raw": {k: v[idx] for k, v in self.raw[condition].items()}, "pooled": self.pooled[condition][idx]}

    def head(self, n: int) -> "EditSet":
        """The first ``n`` examples (the training set's view the size of the test split)."""
        keep = slice(0, min(n, len(self)))
        examples = {"inputs": self.inputs[keep], "targets": self.targets[keep],
                    "instructions": self.instructions[keep], "edit_ids": self.edit_ids[keep]}
        return EditSet(examples, self.text_states[keep], self.text_mask[keep],
                       {c: {k: v[keep] for k, v in streams.items()} for c, streams in self.raw.items()})

    def chunks(self, condition: str, size: int = 128):
        for start in range(0, len(self), size):
            yield self.batch(torch.arange(start, min(start + size, len(self))), condition)


def encode_raw(encoder, images: Tensor, instructions: list[str], chunk: int = 128) -> dict[str, Tensor]:
    """Raw condition streams for a whole set, computed in chunks."""
    parts = [encoder.raw(images[i:i + chunk], instructions[i:i + chunk]) for i in range(0, len(images), chunk)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def build_set(examples: dict, text_encoder: TextEncoder, encoders: dict, editor_cfg: EditorConfig, device) -> EditSet:
    states, mask = text_encoder.encode(examples["instructions"], editor_cfg.max_text_tokens)
    raw = {name: encode_raw(enc, examples["inputs"], examples["instructions"]) for name, enc in encoders.items()}
    to = lambda t: t.to(device)
    examples = {**examples, "inputs": to(examples["inputs"]), "targets": to(examples["targets"]),
                "edit_ids": to(examples["edit_ids"])}
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
