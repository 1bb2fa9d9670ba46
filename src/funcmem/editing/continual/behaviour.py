"""What an update *does*, read off its effect on procedural probe images: the removal's behaviour gate.

A removal that only looks at conditions (``funcmem.distill.Neighbourhood``) cannot tell which of the
conditions near a kept edit's stored instructions mean the removed edit: held-out wordings of an edit
can sit nearer another edit's stored instructions than its own. The gate judges an update by its
behaviour instead. Every update is mounted on the frozen editor and run on a few probe images (smooth
random colour fields drawn from a seed: no photo, no training data) with one neutral instruction; its
*signature* is the change it makes there, flattened. Each stored edit's behaviour is the mean signature
of its stored conditions' updates. An update's gate is the softmax weight (over edits, of the cosine of
its signature to each edit's behaviour, over ``temperature``) of the removed edits:

    probes = probe_images(8, 32, seed=0)                                   # (8, 3, 32, 32)
    signature = Signature(memory, probes, text_states, text_mask)  # LoRA (n) -> (n, 8 * 3 * 32 * 32)
    gate = BehaviourGate(signature, stored_updates, store.labels, removed_ids, temperature=0.05)
    gate(lora)                                                             # (n,) in [0, 1]

``funcmem.distill.retarget`` takes the gate (``gate=``): a kept-side condition near the store keeps
its teacher update times ``1 - gate``, so one that behaves like the removed edit loses its update too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...lora import LoRA
from ..methods import edit_with


def probe_images(n: int, size: int, seed: int = 0, cells: int = 4) -> Tensor:
    """``n`` smooth random colour fields, (n, 3, size, size) in (0, 1): a ``cells`` x ``cells`` grid of
    normal values per channel, bilinearly upsampled, through a sigmoid (saturated and dull colours,
    light and dark, edges and gradients)."""
    g = torch.Generator().manual_seed(seed)
    grid = 2.0 * torch.randn(n, 3, cells, cells, generator=g)
    return torch.sigmoid(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))


class Signature:
    """An update's behaviour: the change it makes to the editor's output on the probe images.

    Args:
        memory: an ``EditingMemory``; its frozen editor (``memory.fm.base``, where ``fm.mounted`` mounts
            a LoRA) makes the outputs.
        probes: (P, 3, S, S) probe images.
        text_states, text_mask: (1, T, D) and (1, T) the editor's text input for every probe.
    """

    def __init__(self, memory, probes: Tensor, text_states: Tensor, text_mask: Tensor, chunk: int = 32):
        self.memory, self.editor, self.chunk = memory, memory.fm.base, chunk
        self.probes, self.text_states, self.text_mask = probes, text_states, text_mask
        with torch.no_grad():
            self.base = edit_with(self.editor, self._batch(1))  # (P, 3, S, S)

    def _batch(self, n: int) -> dict:
        P = len(self.probes)
        return {"inputs": self.probes.repeat(n, 1, 1, 1), "text_states": self.text_states.expand(n * P, -1, -1),
                "text_mask": self.text_mask.expand(n * P, -1)}

    @torch.no_grad()
    def __call__(self, lora: LoRA) -> Tensor:
        """(n, P * 3 * S * S): output with each sample's update minus the base's output, per probe."""
        P, out = len(self.probes), []
        for i in range(0, len(lora), self.chunk):
            part = lora[i:i + self.chunk]
            n = len(part)
            edited = edit_with(self.editor, self._batch(n), part.repeat_interleave(P), self.memory.fm.mounted)
            out.append((edited - self.base.repeat(n, 1, 1, 1)).reshape(n, -1))
        return torch.cat(out)


class BehaviourGate:
    """How much an update behaves like the removed labels: (n,) in [0, 1].

    Args:
        signature: ``Signature`` (or any LoRA -> (n, D) map).
        updates: the stored conditions' updates (``distill.generate_all``), in store order.
        labels: (n_store,) their labels.
        removed: the labels to remove.
        temperature: of the softmax over labels of the cosine to each label's mean signature.
    """

    def __init__(self, signature, updates: LoRA, labels: Tensor, removed: list[int], temperature: float = 0.05):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.signature, self.temperature = signature, temperature
        s, labels = signature(updates), labels.long().cpu()
        self.labels = labels.unique()  # (K,) sorted
        self.behaviour = F.normalize(torch.stack([s[labels == k].mean(0) for k in self.labels.tolist()]), dim=1)
        self.removed = torch.isin(self.labels, torch.tensor(removed))
        if not self.removed.any():
            raise ValueError(f"no stored update has a removed label ({removed})")

    def weights(self, lora: LoRA) -> Tensor:
        """(n, K) softmax over the stored labels (``self.labels``) of cosine / temperature."""
        cos = F.normalize(self.signature(lora), dim=1) @ self.behaviour.T
        return torch.softmax(cos / self.temperature, dim=1)

    def __call__(self, lora: LoRA) -> Tensor:
        return self.weights(lora)[:, self.removed].sum(1)
