"""Removing edits from the ``fm_replay`` generator (``--forget EDIT[,EDIT...]``) and measuring it.

The removal fine-tunes the generator on the replay store only (``funcmem.distill.forget``): the
removed edits' stored conditions, and conditions near them (``funcmem.distill.Neighbourhood``:
their instruction tokens with other stored photos' tokens, ...), go to a zero update (the base
editor's output); every other stored condition, and its neighbourhood, keeps its update, except the
share the behaviour gate (``behaviour.BehaviourGate``) takes from drawn conditions whose update acts
like a removed edit's on probe images.

What is measured (``continual.json["forget"]``), before and after, PSNR in dB:

- ``removed_psnr_to_base``: the removed edits' output vs the base editor's, on the test split (other
  photos, held-out wording); ``removed_psnr_to_base_seen``: the same photos, training wording.
  High = no update left;
- ``kept_psnr_before`` / ``_after``: every other edit vs its target (mean over edits);
- ``near_miss_psnr_before`` / ``_after``: the edits a removal is likeliest to hit (``near_misses``:
  each removed edit's inverse and the edits whose instructions MiniLM puts nearest), per edit and mean;
- ``relearn_psnr``: the removed edits vs their targets after an undo (``funcmem.distill.relearn``
  from the updates recorded for their stored conditions before the removal), on a copy.
"""

from __future__ import annotations

import copy
import time

import torch
from torch import Tensor

from ... import distill
from ...train import TrainConfig
from ..benchmark.sets import EditSet
from ..methods import Base
from ..metrics import psnr
from ..ops import EDITS
from . import behaviour
from .config import EDIT_NAMES, FORGET_GATE, ContinualConfig


def parse_edits(text: str) -> list[str]:
    """``"denoise,tint"`` -> ``["denoise", "tint"]``; ValueError naming an unknown, repeated or missing edit."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise ValueError(f"expected edit names separated by commas, got {text!r}")
    unknown = [n for n in names if n not in EDIT_NAMES]
    if unknown:
        raise ValueError(f"unknown edit {unknown[0]!r}; edits: {', '.join(EDIT_NAMES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"edit {repeated[0]!r} named twice")
    return names


def near_misses(removed: list[str], text_encoder, nearest: int = 2) -> list[str]:
    """The edits a removal is likeliest to hit by mistake: each removed edit's inverse (``Edit.inverse``)
    and the ``nearest`` other edits whose training instructions are closest to its own (cosine of the
    mean MiniLM sentence embedding); removed edits excluded, in ``EDIT_NAMES`` order."""
    others = [e for e in EDIT_NAMES if e not in removed]
    centre = {e: text_encoder.embed(list(EDITS[e].train_phrasings)).mean(0) for e in EDIT_NAMES}
    picked = set()
    for r in removed:
        if EDITS[r].inverse in others:
            picked.add(EDITS[r].inverse)
        sims = torch.stack([torch.cosine_similarity(centre[r], centre[o], dim=0) for o in others])
        picked.update(others[i] for i in sims.argsort(descending=True)[:nearest].tolist())
    return [e for e in others if e in picked]


def instruction_positions(projector, raw: dict[str, Tensor]) -> Tensor:
    """(L,) bool over the condition sequence: True at positions the instruction's streams (``text*``)
    fill, False at the photo's (``ConditionProjector`` concatenates its streams in ``raw_dims`` order)."""
    parts = []
    for name in projector.raw_dims:
        length = 1 if raw[name].dim() == 2 else raw[name].shape[1]
        parts.append(torch.full((length,), name.startswith("text"), dtype=torch.bool))
    return torch.cat(parts)


def psnr_per_edit(pred: Tensor, reference: Tensor, edit_ids: Tensor, names: list[str] = EDIT_NAMES) -> dict:
    """Mean PSNR of ``pred`` to ``reference`` per edit: (n, 3, H, W) x2, (n,) ids -> {name: dB} for
    the edits present (each example's PSNR, ``metrics.psnr``, then the mean over the edit's examples)."""
    values, ids = psnr(pred, reference).cpu(), edit_ids.cpu()
    return {names[k]: values[ids == k].mean().item() for k in ids.unique().tolist()}


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@torch.no_grad()
def outputs(method, data: EditSet, condition: str) -> Tensor:
    """The method's edited images for the whole set, (n, 3, H, W) clamped to [0, 1]."""
    method.eval()
    return torch.cat([method.predict(b).clamp(0, 1) for b in data.chunks(condition)])


def measure(memory, base_out: dict, sets: dict[str, EditSet], condition: str) -> dict:
    """Per edit: PSNR to target on the test split (``to_target``) and, on every set, to the base's output."""
    out = {name: outputs(memory, s, condition) for name, s in sets.items()}
    test = sets["test"]
    return {"to_target": psnr_per_edit(out["test"], test.targets, test.edit_ids),
            **{f"to_base_{name}": psnr_per_edit(o, base_out[name], sets[name].edit_ids) for name, o in out.items()}}


def summarise(before: dict, after: dict, removed: list[str], near: list[str]) -> dict:
    """``continual.json["forget"]``'s numbers from two ``measure`` results (means over edits)."""
    kept = [e for e in before["to_target"] if e not in removed]
    near = [e for e in near if e in before["to_target"]]
    pick = lambda d, edits: {e: d[e] for e in edits}
    return {
        "removed_psnr_to_base": mean(after["to_base_test"][e] for e in removed),
        "removed_psnr_to_base_seen": mean(after["to_base_seen"][e] for e in removed),
        "removed_psnr_to_base_before": mean(before["to_base_test"][e] for e in removed),
        "removed_psnr_to_base_seen_before": mean(before["to_base_seen"][e] for e in removed),
        "removed_psnr_to_target_before": mean(before["to_target"][e] for e in removed),
        "removed_psnr_to_target_after": mean(after["to_target"][e] for e in removed),
        "removed_per_edit_to_base": pick(after["to_base_test"], removed),
        "kept_psnr_before": mean(before["to_target"][e] for e in kept),
        "kept_psnr_after": mean(after["to_target"][e] for e in kept),
        "kept_per_edit_before": pick(before["to_target"], kept), "kept_per_edit_after": pick(after["to_target"], kept),
        "near_miss_edits": near,
        "near_miss_psnr_before": mean(before["to_target"][e] for e in near),
        "near_miss_psnr_after": mean(after["to_target"][e] for e in near),
        "near_miss_per_edit_before": pick(before["to_target"], near),
        "near_miss_per_edit_after": pick(after["to_target"], near)}


def train_config(cfg: ContinualConfig, steps: int, what: str) -> TrainConfig:
    every = max(1, steps // 20)
    return TrainConfig(steps=steps, lr=cfg.forget_lr, grad_clip=1.0, warmup_steps=every, description=what,
                       log_every=every)


def neighbourhood(memory, data: EditSet, cfg: ContinualConfig) -> distill.Neighbourhood | None:
    """The run's ``forget_near`` settings, with the instruction's positions read from ``data``'s streams."""
    if not cfg.forget_near:
        return None
    positions = instruction_positions(memory.projector, data.raw[cfg.condition])
    return distill.Neighbourhood(positions, **cfg.forget_near)


def gate_settings(cfg: ContinualConfig) -> dict:
    """The behaviour gate's settings the removal uses: ``cfg.forget_gate`` over the defaults (a partial
    setting keeps ``FORGET_GATE`` for the rest); empty when the gate is off."""
    return {**FORGET_GATE, **cfg.forget_gate} if cfg.forget_gate else {}


def behaviour_gate(memory, store, ids: list[int], text_encoder, cfg: ContinualConfig):
    """The run's behaviour gate (``behaviour.BehaviourGate`` on the stored updates), or None when off."""
    g = gate_settings(cfg)
    if not g:
        return None
    editor = memory.fm.base  # the editor the generator's updates mount on
    states, mask = text_encoder.encode([g["text"]], editor.config.max_text_tokens)
    device = next(editor.parameters()).device
    probes = behaviour.probe_images(g["probes"], cfg.benchmark.size, seed=cfg.seed).to(device)
    signature = behaviour.Signature(memory, probes, states.to(device), mask.to(device))
    return behaviour.BehaviourGate(signature, distill.generate_all(memory, store.conditions), store.labels, ids,
                                   g["temperature"])


def forget_experiment(learner, editor, sets: dict[str, EditSet], edits: list[str], near: list[str],
                      cfg: ContinualConfig, text_encoder=None) -> dict:
    """Remove ``edits`` from a trained ``fm_replay`` learner and measure both sides.

    ``sets``: ``test`` (every taught edit: other photos, held-out wording) and ``seen`` (the removed
    edits on the test photos with training wording). The learner's generator keeps the removal.
    ``text_encoder`` (MiniLM): the behaviour gate's neutral instruction (needed when ``cfg.forget_gate``).
    """
    memory, store, cond = learner.method, learner.store, cfg.condition
    ids = [EDIT_NAMES.index(e) for e in edits]
    base_out = {name: outputs(Base(editor), s, cond) for name, s in sets.items()}
    before = measure(memory, base_out, sets, cond)
    removed = torch.isin(store.labels, torch.tensor(ids, dtype=store.labels.dtype))
    recorded = distill.generate_all(memory, store.conditions[removed])  # for the undo
    start = time.perf_counter()
    history = distill.forget(memory, store, ids, train_config(cfg, cfg.forget_steps, f"forget {','.join(edits)}"),
                             batch=cfg.replay_batch, seed=cfg.seed, near=neighbourhood(memory, sets["test"], cfg),
                             gate=behaviour_gate(memory, store, ids, text_encoder, cfg))
    seconds = time.perf_counter() - start
    memory.eval()
    after = measure(memory, base_out, sets, cond)
    undo = copy.deepcopy(memory)
    distill.relearn(undo, store, ids, recorded, train_config(cfg, cfg.relearn_steps, f"relearn {','.join(edits)}"),
                    batch=cfg.replay_batch, seed=cfg.seed)
    undo.eval()
    relearnt = measure(undo, base_out, sets, cond)["to_target"]
    return {"edits": edits, **summarise(before, after, edits, near),
            "relearn_psnr": mean(relearnt[e] for e in edits),
            "relearn_kept_psnr": mean(v for e, v in relearnt.items() if e not in edits),
            "base_psnr_removed": mean(psnr_per_edit(base_out["test"], sets["test"].targets,
                                                    sets["test"].edit_ids)[e] for e in edits),
            "neighbourhood": dict(cfg.forget_near), "gate": gate_settings(cfg), "store_conditions_used": len(store),
            "steps": cfg.forget_steps, "seconds": round(seconds, 1), "final_losses": history[-1] if history else {}}
