"""The methods the editing benchmark compares, all on one frozen base editor.

- ``identity``: the input returned unchanged (what doing nothing scores);
- ``base``: the editor alone;
- ``SharedLoRA`` (from the core): one static LoRA; the ``_matched`` variant has a higher rank;
- ``Bank`` (the core ``LoRABank``): one LoRA per edit; a sample picks its LoRA by the true edit label (the oracle
  ``per_task_lora``), by the nearest key to its condition (``retrieval_lora``), or, for an
  instruction naming two edits, the two edits' LoRAs added (``lora_sum``: LoRA arithmetic);
- ``EditingMemory``: functional memory: a condition projector + the generator.

Every method is a module with ``predict(batch) -> (B, 3, S, S)``; a batch is a dict with
``inputs``, ``targets``, ``text_states``, ``text_mask``, ``edit_ids`` (the first edit),
``second_ids`` (the second edit, -1 for single edits) and the raw condition streams under ``raw``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generator import GeneratorConfig
from ..io import read_json, read_safetensors, write_json, write_safetensors
from ..lora import LoRA
from ..bank import LoRABank, SharedLoRA
from ..memory import FunctionalMemory
from .conditions import ConditionProjector
from .editor import Editor

PROJECTOR_CONFIG, PROJECTOR_WEIGHTS = "projector.json", "projector.safetensors"
KEYS_NAME = "keys.safetensors"  # a Bank's retrieval keys


def edit_with(editor: Editor, batch: dict, lora: LoRA | None = None, mount=None) -> Tensor:
    """Run the editor on a batch, with ``lora`` mounted through ``mount`` (a method's ``mounted``)."""
    args = (batch["inputs"], batch["text_states"], batch["text_mask"])
    if lora is None:
        return editor(*args)
    with mount(lora):
        return editor(*args)


class Identity(nn.Module):
    """Returns the input: the score of doing nothing, a row of every table."""

    def predict(self, batch: dict) -> Tensor:
        return batch["inputs"]


class Base(nn.Module):
    def __init__(self, editor: Editor):
        super().__init__()
        self.editor = editor

    def predict(self, batch: dict) -> Tensor:
        return edit_with(self.editor, batch)


class Shared(SharedLoRA):
    """``SharedLoRA`` with the benchmark's ``predict``."""

    def predict(self, batch: dict) -> Tensor:
        return edit_with(self.base, batch, self.lora(), self.mounted)


class Bank(LoRABank):
    """The core ``LoRABank`` (one LoRA per edit) with the benchmark's ``predict``; sample i uses LoRA
    ``choice[i]``.

    Args:
        editor: the frozen base.
        targets, rank, alpha: as ``SharedLoRA``.
        num: K, one per edit.

    ``route``: "label" (oracle: the true first edit id), "retrieval" (nearest key, see ``set_keys``)
    or "sum" (``lora_sum``: a sample naming two edits gets both LoRAs added, B1 A1 + B2 A2 at the same
    scale, told both labels; a single edit gets its own). The benchmark trains the bank with "sum".
    """

    def __init__(self, editor: Editor, targets, rank: int, alpha: float, num: int, exclude=None):
        super().__init__(editor, targets, rank, alpha, num, exclude)
        self.route = "label"
        self.register_buffer("keys", torch.zeros(num, 1))

    def set_keys(self, pooled: Tensor, edit_ids: Tensor) -> None:
        """Key k = mean pooled condition of edit k's training samples (pooled (n, F), unit rows)."""
        self.keys = torch.stack([pooled[edit_ids == k].mean(0) for k in range(self.num)])

    def retrieve(self, pooled: Tensor) -> Tensor:
        """Index of the nearest key by cosine, per sample: pooled (B, F) -> (B,)."""
        return (F.normalize(pooled, dim=-1) @ F.normalize(self.keys, dim=-1).T).argmax(-1)

    def choice(self, batch: dict) -> Tensor:
        return batch["edit_ids"] if self.route == "label" else self.retrieve(batch["pooled"])

    def predict(self, batch: dict) -> Tensor:
        lora = self.summed(batch) if self.route == "sum" else self.lora(self.choice(batch))
        return edit_with(self.base, batch, lora, self.mounted)

    def summed(self, batch: dict) -> LoRA:
        """Per sample, the first edit's LoRA plus the second's (factors concatenated along the rank,
        so the update is B1 A1 + B2 A2); the second half is zero for single edits."""
        first = batch["edit_ids"]
        second = batch.get("second_ids", torch.full_like(first, -1))
        all_rows = self.lora()
        factors = {}
        for name, (a, b) in all_rows.factors.items():
            keep = (second >= 0).to(b.dtype).view(-1, *([1] * (b.dim() - 1)))
            a2, b2 = a[second.clamp(min=0)], b[second.clamp(min=0)] * keep
            factors[name] = (torch.cat([a[first], a2], dim=-2), torch.cat([b[first], b2], dim=-1))
        return LoRA(factors, all_rows.scale)

    def save_pretrained(self, path) -> None:
        """The bank's directory (``LoRABank.save_pretrained``) plus the retrieval keys."""
        super().save_pretrained(path)
        write_safetensors(Path(path) / KEYS_NAME, {"keys": self.keys})

    @classmethod
    def from_pretrained(cls, path, base: nn.Module) -> "Bank":
        bank = super().from_pretrained(path, base)
        bank.keys = read_safetensors(Path(path) / KEYS_NAME)["keys"]
        return bank


class EditingMemory(nn.Module):
    """Functional memory for the editor: raw condition -> projector -> generator -> LoRA.

    Args:
        projector: maps the condition encoder's raw streams to (B, L, condition_dim).
        fm: the ``FunctionalMemory`` on the frozen editor.

    ``EditingMemory.create`` builds a fresh one; ``save_pretrained`` / ``from_pretrained`` use the
    generator's own directory format plus the projector (``projector.json``, ``projector.safetensors``).
    """

    def __init__(self, projector: ConditionProjector, fm: FunctionalMemory):
        super().__init__()
        if projector.dim != fm.condition_dim:
            raise ValueError(f"the projector's width {projector.dim} is not the generator's condition_dim "
                             f"{fm.condition_dim}")
        self.projector, self.fm = projector, fm

    @classmethod
    def create(cls, editor: Editor, raw_dims: dict[str, int], targets, rank: int, alpha: float,
               condition_dim: int, generator: GeneratorConfig, advise: bool = True) -> "EditingMemory":
        """A fresh projector (``raw_dims``: the condition encoder's) and generator on ``editor``
        (``advise``: as ``FunctionalMemory``'s)."""
        return cls(ConditionProjector(raw_dims, condition_dim),
                   FunctionalMemory(editor, targets, rank, alpha, condition_dim, generator, advise=advise))

    mask_padding = True  # the generator does not attend to padded condition tokens

    def condition(self, batch: dict) -> Tensor:
        return self.projector(batch["raw"])

    def generate(self, condition: Tensor) -> LoRA:
        """The LoRA of projected conditions (B, L, dim); padded positions (the projector writes
        them as exact zeros) are masked out of the generator's attention."""
        return self.fm.generate(condition, padding_mask(condition) if self.mask_padding else None)

    def lora(self, batch: dict, condition: Tensor | None = None) -> LoRA:
        return self.generate(self.condition(batch) if condition is None else condition)

    def predict(self, batch: dict, condition: Tensor | None = None) -> Tensor:
        return edit_with(self.fm.base, batch, self.lora(batch, condition), self.fm.mounted)

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def save_pretrained(self, path) -> None:
        """The generator's directory (``FunctionalMemory.save_pretrained``) plus the projector."""
        path = Path(path)
        self.fm.save_pretrained(path)
        write_json(path / PROJECTOR_CONFIG, {"raw_dims": self.projector.raw_dims, "dim": self.projector.dim})
        write_safetensors(path / PROJECTOR_WEIGHTS, self.projector.state_dict())

    @classmethod
    def from_pretrained(cls, path, editor: Editor) -> "EditingMemory":
        """Rebuild on ``editor``; the generator goes through ``FunctionalMemory.from_pretrained``
        (which refuses an editor whose targets differ from the saved ones)."""
        path = Path(path)
        config = read_json(path / PROJECTOR_CONFIG)
        projector = ConditionProjector(config["raw_dims"], config["dim"])
        projector.load_state_dict(read_safetensors(path / PROJECTOR_WEIGHTS))
        return cls(projector, FunctionalMemory.from_pretrained(path, editor))


def padding_mask(condition: Tensor) -> Tensor:
    """(B, L) bool, True for real tokens of a projected condition (B, L, dim): the projector writes
    padding as exact zeros (``ConditionProjector.mask`` of the raw streams says the same)."""
    mask = condition.ne(0).any(-1)
    empty = ~mask.any(1)
    return mask | empty[:, None]  # an all-zero condition: attend to all of it rather than to nothing


def pooled_condition(raw: dict[str, Tensor]) -> Tensor:
    """One vector per sample for retrieval: each stream mean-pooled (over real tokens), L2-normalised,
    concatenated. raw streams (B, L, F_s) or (B, F_s) -> (B, sum F_s)."""
    parts = []
    for name, x in raw.items():
        if name.endswith("_mask"):
            continue
        x = x[:, None] if x.dim() == 2 else x
        mask = raw.get(f"{name}_mask")
        m = torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float()
        parts.append(F.normalize((x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1), dim=-1))
    return torch.cat(parts, dim=-1)


def mse_loss(method: nn.Module, batch: dict) -> Tensor:
    return F.mse_loss(method.predict(batch), batch["targets"])
