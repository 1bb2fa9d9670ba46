"""The continual protocol: edit groups taught one stage after another, every method scored on every
group seen so far after each stage, then (optionally) edits removed from the ``fm_replay`` generator.

Stage k sees only group k's training examples. After every stage each method is scored (PSNR) on
the test examples of every group seen so far, which fills a stage x group matrix R (R[i][j]: after
stage i, on group j); ``summarize`` turns it into average PSNR, forgetting and backward transfer.

Removing edits (``--forget EDIT[,EDIT...]``): ``removal.forget_experiment`` fine-tunes the
``fm_replay`` generator on stored conditions only (and conditions derived from them): the removed
edits' go to a zero update (the base's output), the others keep their updates.

    groups -> per-stage EditSets -> for each stage, each method: learn, score -> matrices
    -> summarize -> continual.json / .png / .md, and a run directory with the fm_replay generator
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ... import io
from .. import rundir
from ..benchmark.evaluate import evaluate
from ..benchmark.sets import EditSet, build_set, photo_split
from ..benchmark.training import Timer
from ..conditions import TextEncoder, make_encoder
from ..tasks import make_examples
from ..editor import EditorConfig
from ..methods import Base
from ..pretrain import load_or_train_editor
from .config import EDIT_NAMES, METHODS, ContinualConfig
from . import removal
from .learners import make_learners
from .report import plot, report


def summarize(matrix: list[list[float | None]]) -> dict:
    """Continual-learning summary of a stage x group score matrix (higher is better).

    R[i][j] is the score on group j after stage i (None before group j is taught, j > i); T stages.

    - ``average``: mean_j R[T-1][j], the final score over all groups;
    - ``forgetting``: per earlier group j < T-1, the best score it ever had before the end minus its
      final one, max_{j <= i < T-1} R[i][j] - R[T-1][j]; ``mean_forgetting`` averages them;
    - ``backward_transfer``: mean_{j < T-1} (R[T-1][j] - R[j][j]): < 0 when later stages hurt.
    With one stage, forgetting and backward transfer are 0.
    """
    T = len(matrix)
    if T == 0 or any(len(row) != T for row in matrix):
        raise ValueError(f"need a square stage x group matrix, got {[len(r) for r in matrix]}")
    if any(matrix[i][j] is None for i in range(T) for j in range(i + 1)):
        raise ValueError("the matrix needs every entry on or below the diagonal")
    final = matrix[-1]
    forgetting = [max(matrix[i][j] for i in range(j, T - 1)) - final[j] for j in range(T - 1)]
    bwt = [final[j] - matrix[j][j] for j in range(T - 1)]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    return {"average": mean(final), "forgetting": forgetting, "mean_forgetting": mean(forgetting),
            "backward_transfer": mean(bwt)}


@dataclass
class Stage:
    name: str
    edits: list
    train: EditSet
    test: EditSet


def make_stages(cfg: ContinualConfig, text_encoder: TextEncoder, encoder, editor_cfg: EditorConfig) -> list[Stage]:
    """Per group: its own train / test examples (test photos held out), edit ids global (``EDIT_NAMES``)."""
    unknown = [e for edits in cfg.groups.values() for e in edits if e not in EDIT_NAMES]
    if unknown:
        raise ValueError(f"unknown edits {unknown}; edits: {EDIT_NAMES}")
    b = cfg.benchmark
    train_photos, test_photos = photo_split(b.images, b.data_seed)
    stages = []
    for k, (name, edits) in enumerate(cfg.groups.items()):
        global_ids = torch.tensor([EDIT_NAMES.index(e) for e in edits])
        sets = []
        for split, photos, n, seed in (("train", train_photos, cfg.train_per_group, b.data_seed + 2 * k),
                                       ("test", test_photos, cfg.test_per_group, b.data_seed + 2 * k + 1)):
            ex = make_examples(photos, edits, n, b.size, split, seed)
            ex["edit_ids"] = global_ids[ex["edit_ids"]]
            sets.append(build_set(ex, text_encoder, {cfg.condition: encoder}, editor_cfg, b.device))
        stages.append(Stage(name, list(edits), *sets))
    return stages


# ------------------------------------------------------------------ removing edits


def subset(sets: list[EditSet], keep) -> EditSet:
    """The examples of several sets for which ``keep(edit_ids)`` is true, as one set."""
    parts = []
    for s in sets:
        idx = keep(s.edit_ids).nonzero().flatten()
        parts.append((s, idx))
    cat = lambda get: torch.cat([get(s)[i] for s, i in parts])
    examples = {"inputs": cat(lambda s: s.inputs), "targets": cat(lambda s: s.targets),
                "edit_ids": cat(lambda s: s.edit_ids),
                "instructions": [s.instructions[j] for s, i in parts for j in i.tolist()]}
    raw = {name: {k: torch.cat([s.raw[name][k][i] for s, i in parts]) for k in parts[0][0].raw[name]}
           for name in parts[0][0].raw}
    return EditSet(examples, cat(lambda s: s.text_states), cat(lambda s: s.text_mask), raw)


def removal_sets(cfg: ContinualConfig, stages: list[Stage], edits: list[str], text_encoder, encoder,
                 editor_cfg: EditorConfig) -> dict[str, EditSet]:
    """``test``: every stage's test set (other photos, held-out wording); ``seen``: the removed edits on the
    test photos with training wording (``test_per_group`` examples per removed edit's stage, balanced)."""
    b = cfg.benchmark
    _, test_photos = photo_split(b.images, b.data_seed)
    n = max(len(edits), cfg.test_per_group * len(edits) // 4)
    ex = make_examples(test_photos, edits, n, b.size, "train", b.data_seed + 1000)
    ex["edit_ids"] = torch.tensor([EDIT_NAMES.index(e) for e in edits])[ex["edit_ids"]]
    seen = build_set(ex, text_encoder, {cfg.condition: encoder}, editor_cfg, b.device)
    return {"test": subset([s.test for s in stages], lambda ids: torch.ones_like(ids, dtype=torch.bool)),
            "seen": seen}


def check_forget(cfg: ContinualConfig, forget: list[str], methods) -> None:
    """Refuse a removal the run cannot make, before anything trains."""
    if "fm_replay" not in methods:
        raise ValueError("--forget removes edits from the fm_replay generator: keep fm_replay in the methods")
    taught = [e for edits in cfg.groups.values() for e in edits]
    unknown = [e for e in forget if e not in taught]
    if unknown:
        raise ValueError(f"edit {unknown[0]!r} is in no stage of this run ({', '.join(taught)})")
    if not set(taught) - set(forget):
        raise ValueError("--forget names every edit of the run: nothing would be kept")


# ------------------------------------------------------------------ the protocol


def teach(stages: list[Stage], learners: dict, cfg: ContinualConfig, timer: Timer) -> dict:
    """Every stage in turn, every learner on it; each method's stage x group matrix and storage."""
    T = len(stages)
    out = {m: {"matrix": [[None] * T for _ in range(T)], "storage": []} for m in learners}
    for k, stage in enumerate(stages):
        for m, learner in learners.items():
            with timer.stage(m):
                learner.learn(k, stage.train, f"{m}: stage {stage.name}")  # stage k's data only
                for j in range(k + 1):
                    out[m]["matrix"][k][j] = evaluate(learner.method, stages[j].test, cfg.condition)["psnr"]
            out[m]["storage"].append(learner.storage())
    return out


def method_results(taught: dict, learners: dict, cfg: ContinualConfig) -> dict:
    """Per method: its matrix, its summary and its storage (the store's shape for ``fm_replay``)."""
    out = {}
    for m, r in taught.items():
        final = r["storage"][-1]
        out[m] = {"matrix": r["matrix"], **summarize(r["matrix"]), "storage_bytes": final["weights"] + final["store"],
                  "storage": final, "storage_bytes_by_stage": [s["weights"] + s["store"] for s in r["storage"]]}
    if "fm_replay" in learners:
        store = learners["fm_replay"].store
        out["fm_replay"]["store"] = {
            "conditions": len(store), "bytes": store.nbytes, "shape": list(store.conditions.shape),
            "dtype": str(store.conditions.dtype).replace("torch.", ""), "per_edit": cfg.store_per_edit}
    return out


def run(cfg: ContinualConfig, out: str | Path, forget: list[str] | str | None = None, methods=METHODS,
        progress: bool = True) -> dict:
    """The whole protocol; writes ``continual.json``, ``continual.png``, ``continual.md`` and, with
    ``fm_replay``, a run directory of its final generator (``editing.rundir``) to ``out``."""
    out, b = Path(out), cfg.benchmark
    out.mkdir(parents=True, exist_ok=True)
    forget = [forget] if isinstance(forget, str) else forget
    if forget:
        check_forget(cfg, forget, methods)
    timer, start = Timer(), time.perf_counter()
    torch.manual_seed(b.data_seed)
    with timer.stage("base_editor"):
        text_encoder = TextEncoder()
        editor_cfg = EditorConfig.from_dict({**b.editor, "image_size": b.size})
        editor = load_or_train_editor(editor_cfg, b.cache_dir, steps=b.editor_steps, text_encoder=text_encoder,
                                      progress=progress).to(b.device)
    with timer.stage("data_and_features"):
        encoder = make_encoder(cfg.condition, editor, text_encoder)
        stages = make_stages(cfg, text_encoder, encoder, editor_cfg)
    learners = make_learners(editor, encoder, stages[0].train, cfg, methods)
    taught = teach(stages, learners, cfg, timer)
    base = [evaluate(Base(editor), s.test, cfg.condition)["psnr"] for s in stages]
    results = {"config": asdict(cfg), "stages": [{"name": s.name, "edits": s.edits, "train_examples": len(s.train),
                                                  "test_examples": len(s.test)} for s in stages],
               "base_psnr": base, "methods": method_results(taught, learners, cfg)}
    if forget:
        with timer.stage("forget"):
            sets = removal_sets(cfg, stages, forget, text_encoder, encoder, editor_cfg)
            near = removal.near_misses(forget, text_encoder)
            results["forget"] = removal.forget_experiment(learners["fm_replay"], editor, sets, forget, near, cfg,
                                                                 text_encoder)
    if "fm_replay" in learners:
        rundir.save_run(out, asdict(b), editor, {"functional_memory": learners["fm_replay"].method})
    results["timing"] = {**timer.seconds, "total": round(time.perf_counter() - start, 1)}
    io.write_json(out / "continual.json", results)
    plot(results, out / "continual.png")
    (out / "continual.md").write_text(report(results))
    return results
