"""The paper's claims, measured: gradient conflict, conditional routing, the parameter manifold,
storage and latency."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ...lora import LoRA, update_gram
from ..methods import mse_loss
from ..metrics import psnr
from ..ops import INVERSE_PAIRS


def inverse_pairs(edit_names: list[str]) -> list[tuple[int, int]]:
    return [(edit_names.index(a), edit_names.index(b)) for a, b in INVERSE_PAIRS if a in edit_names and b in edit_names]


def _summary(matrix: torch.Tensor, pairs: list[tuple[int, int]]) -> dict:
    k = matrix.shape[0]
    off = matrix[~torch.eye(k, dtype=torch.bool)]
    return {"matrix": matrix.tolist(), "mean_inverse_pairs": statistics.mean(matrix[i, j].item() for i, j in pairs),
            "mean_all_pairs": off.mean().item()}


class ConflictTracker:
    """Per-edit gradients of a shared LoRA and their cosine matrix, at initialisation, halfway and
    at the end of its training (a ``Trainer.fit`` callback)."""

    def __init__(self, shared, data, condition: str, num_edits: int, cfg):
        self.shared, self.num_edits, self.steps = shared, num_edits, cfg.steps
        g = torch.Generator().manual_seed(1234)
        ids = torch.where(data.second_ids.cpu() < 0, data.edit_ids.cpu(), -1)  # single edits only
        self.batches = []
        for k in range(num_edits):
            rows = (ids == k).nonzero().flatten()
            rows = rows[torch.randperm(len(rows), generator=g)[: cfg.conflict_samples]]
            self.batches.append(data.batch(rows.to(data.inputs.device), condition))
        self.by_step: dict[str, dict] = {}

    def gradients(self) -> torch.Tensor:
        """(num_edits, P): the flattened LoRA gradient of each edit's loss."""
        params = [p for p in self.shared.parameters() if p.requires_grad]
        rows = []
        for batch in self.batches:
            grads = torch.autograd.grad(mse_loss(self.shared, batch), params)
            rows.append(torch.cat([g.flatten() for g in grads]))
        return torch.stack(rows)

    def __call__(self, trainer) -> None:
        if trainer.step in (0, self.steps // 2, self.steps) and str(trainer.step) not in self.by_step:
            g = F.normalize(self.gradients(), dim=1)
            self.by_step[str(trainer.step)] = g @ g.T

    def result(self, edit_names: list[str]) -> dict:
        pairs = inverse_pairs(edit_names)
        end = self.by_step[str(self.steps)]
        return {**_summary(end, pairs), "by_step": {s: _summary(m, pairs) for s, m in self.by_step.items()},
                "paper_reference": -0.30}


@torch.no_grad()
def routing(memory, data, condition: str) -> dict:
    """PSNR with the matched condition, another sample's instruction (a different edit, same image),
    the condition averaged over all test samples, and no LoRA at all."""
    ids = data.edit_ids
    n = len(data)
    # partner: the next sample (cyclically) whose edit differs
    partner = torch.empty(n, dtype=torch.long)
    for i in range(n):
        j = (i + 1) % n
        while ids[j] == ids[i]:
            j = (j + 1) % n
        partner[i] = j
    conds = torch.cat([memory.condition(b) for b in data.chunks(condition)])  # (n, L, D)
    text_streams = [k for k in data.raw[condition] if k.startswith("text")]
    out = {"matched": [], "mismatched": [], "averaged": [], "no_lora": []}
    mean_cond = conds.mean(0, keepdim=True)
    for start in range(0, n, 128):
        idx = torch.arange(start, min(start + 128, n))
        batch = data.batch(idx.to(ids.device), condition)
        swapped = dict(batch, raw={k: (data.raw[condition][k][partner[idx]] if k in text_streams else v)
                                   for k, v in batch["raw"].items()})
        target = batch["targets"]
        out["matched"].append(psnr(memory.predict(batch), target))
        out["mismatched"].append(psnr(memory.predict(batch, memory.condition(swapped)), target))
        out["averaged"].append(psnr(memory.predict(batch, mean_cond.expand(len(idx), -1, -1)), target))
        out["no_lora"].append(psnr(memory.fm.base(batch["inputs"], batch["text_states"], batch["text_mask"]), target))
    return {k: torch.cat(v).mean().item() for k, v in out.items()}


def generated_updates(memory, data, condition: str) -> LoRA:
    """The generated LoRA of every sample of ``data`` (one factor row each)."""
    return LoRA.cat([memory.lora(b) for b in data.chunks(condition)])


def _centred(gram: torch.Tensor) -> torch.Tensor:
    """H G H with H = I - 1/n: the Gram of the updates minus their mean."""
    return gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()


def _principal_components(gram: torch.Tensor, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of the updates from their Gram (kernel PCA, linear kernel): scores (n, q) on the first q
    components and every component's variance (n,), largest first."""
    values, vectors = torch.linalg.eigh(_centred(gram.double()))
    values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
    return (vectors[:, :q] * values[:q].sqrt()).float(), values.float()


@torch.no_grad()
def manifold(memory, data, condition: str, edit_names: list[str]) -> tuple[dict, dict]:
    """The generated weight updates ``s B A`` of every test instance, compared through their Gram
    (never formed densely, ``funcmem.lora.update_gram``): silhouette by edit on update distances, PCA
    and t-SNE (for the plot), and how far apart inverse edits' mean updates lie compared with any two
    edits'."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    lora = generated_updates(memory, data, condition)
    gram = update_gram(lora).double().cpu()
    labels = data.edit_ids.cpu().numpy()
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).sqrt().fill_diagonal_(0)
    pcs, variance = _principal_components(gram, min(50, len(gram) - 1))
    tsne = TSNE(n_components=2, perplexity=min(30, len(gram) // 4), init="pca", random_state=0).fit_transform(pcs.numpy())
    k = len(edit_names)
    mean_of = torch.stack([torch.from_numpy(labels == e).double() for e in range(k)])
    mean_of = mean_of / mean_of.sum(1, keepdim=True).clamp(min=1)  # (k, n): averages each edit's samples
    centroid_gram = mean_of @ gram @ mean_of.T
    csq = centroid_gram.diagonal()
    centroid_dist = (csq[:, None] + csq[None, :] - 2 * centroid_gram).clamp(min=0).sqrt()
    pairs = inverse_pairs(edit_names)
    result = {"silhouette": float(silhouette_score(dist.numpy(), labels, metric="precomputed")),
              "silhouette_pca50": float(silhouette_score(pcs.numpy(), labels)),
              "pca_explained_2d": (variance[:2].sum() / variance.sum().clamp(min=1e-30)).item(),
              "inverse_pair_distance": statistics.mean(centroid_dist[i, j].item() for i, j in pairs),
              "mean_pair_distance": centroid_dist[~torch.eye(k, dtype=torch.bool)].mean().item(),
              "lora_numbers_per_instance": lora.flatten().shape[1], "on": "updates"}
    return result, {"pca": pcs[:, :2].numpy(), "tsne": np.asarray(tsne), "labels": labels, "names": edit_names}


@torch.no_grad()
def value_spearman(memory, sets: list, condition: str, min_samples: int = 8) -> dict:
    """Does the generated update follow the value an instruction names? Per edit with numeric values
    (single-edit samples of ``sets``, e.g. seen wording and held-out values): the Spearman
    correlation between the value and the first principal component of that edit's generated
    updates (its sign is arbitrary, so |rho|). Edits with fewer than ``min_samples`` samples or
    fewer than 3 distinct values are left out.

    Returns ``{"per_edit": {edit: |rho|}, "samples": {edit: n}, "mean": mean |rho| or None}``.
    """
    from scipy.stats import spearmanr

    rows: dict[str, list] = {}
    for data in sets:
        if data.instances is None:
            continue
        lora = generated_updates(memory, data, condition)
        for i, inst in enumerate(data.instances):
            if len(inst.edits) == 1 and isinstance(inst.values[0], float):
                rows.setdefault(inst.edits[0], []).append((inst.values[0], lora[i]))
    per_edit, samples = {}, {}
    for edit, items in rows.items():
        values = [v for v, _ in items]
        if len(items) < min_samples or len(set(values)) < 3:
            continue
        gram = update_gram(LoRA.cat([lo for _, lo in items])).cpu()
        scores, _ = _principal_components(gram, 1)
        rho = spearmanr(values, scores[:, 0].numpy()).statistic
        per_edit[edit], samples[edit] = abs(float(rho)) if np.isfinite(rho) else 0.0, len(items)
    return {"per_edit": per_edit, "samples": samples,
            "mean": statistics.mean(per_edit.values()) if per_edit else None}


def storage(memory, bank, shared) -> dict:
    """Bytes (float32) to keep each method's trained weights."""
    size = lambda n: 4 * n
    return {"functional_memory": size(memory.num_trainable_parameters()),
            "per_task_loras": size(bank.num_trainable_parameters()),
            "one_shared_lora": size(shared.num_trainable_parameters()), "num_tasks": bank.num}


@torch.no_grad()
def edit_latency(memory, data, condition: str, repeats: int = 10) -> dict:
    """Milliseconds for one image: generate its LoRA + mounted edit, and the base edit alone
    (frozen features given; median of repeats)."""
    batch = data.batch(torch.tensor([0], device=data.edit_ids.device), condition)
    editor = memory.fm.base

    def timed(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    gen = timed(lambda: memory.lora(batch))
    full = timed(lambda: memory.predict(batch))
    base = timed(lambda: editor(batch["inputs"], batch["text_states"], batch["text_mask"]))
    return {"generate": gen, "generate_and_edit": full, "base_edit": base}


SAMPLE_COLUMNS = (("base", "base"), ("shared_lora", "shared LoRA"), ("bank", "bank (oracle label)"),
                  ("retrieval", "retrieval"), ("functional_memory", "functional memory"))


def _sample_indices(evals: dict) -> list[tuple[str, int, str]]:
    """(split, index, row label): one seen-wording example per edit, then held-out values (tint, a
    value beside the training range, one between) and held-out compositions (three pairs)."""
    seen = evals["seen_wording"]
    rows = [("seen_wording", seen.groups.index(g), g) for g in dict.fromkeys(sorted(set(seen.groups)))]
    values = evals.get("held_out_values")
    if values is not None and values.instances:
        picks = [lambda i: i.edits[0] == "tint", lambda i: i.kinds[0] == "beside", lambda i: i.kinds[0] == "between"]
        for pick in picks:
            hit = next((k for k, inst in enumerate(values.instances) if pick(inst)), None)
            if hit is not None:
                inst = values.instances[hit]
                rows.append(("held_out_values", hit, f"{inst.edits[0]} {inst.kinds[0]} ({inst.values[0]})"))
    pairs = evals.get("held_out_compositions")
    if pairs is not None:
        for g in list(dict.fromkeys(pairs.groups))[:3]:
            rows.append(("held_out_compositions", pairs.groups.index(g), g))
    return rows


@torch.no_grad()
def sample_rows(evals: dict, condition: str, methods: dict) -> dict:
    """Rows for edits.png: input, target and each method's output with its PSNR to the target.

    ``methods``: "base", "shared_lora", "per_task_lora" (a ``Bank``: told the edit, both edits' LoRAs
    added for a composition, and again routed by retrieval) and "functional_memory"."""
    bank = methods["per_task_lora"]
    rows = []
    for split, i, label in _sample_indices(evals):
        data = evals[split]
        b = data.batch(torch.tensor([i], device=data.edit_ids.device), condition)
        outs = {}
        for key, _ in SAMPLE_COLUMNS:
            if key in ("bank", "retrieval"):
                bank.route = "sum" if key == "bank" else "retrieval"
                outs[key] = bank.predict(b)
                bank.route = "label"
            else:
                outs[key] = methods[key].predict(b)
        images = [b["inputs"], b["targets"], *outs.values()]
        rows.append({"edit": label, "split": split, "instruction": data.instructions[i],
                     "images": [t[0].clamp(0, 1).cpu() for t in images],
                     "psnr": [psnr(t.clamp(0, 1), b["targets"]).item() for t in images]})
    return {"columns": ["input", "target", *(name for _, name in SAMPLE_COLUMNS)], "rows": rows}


@torch.no_grad()
def instruction_probe(text_encoder, train_set, *eval_sets) -> list[float]:
    """How well the instruction alone names its edit: nearest-centroid accuracy of MiniLM sentence
    embeddings (centroids from the single-edit training instructions), one value per evaluation set.

    This bounds what any method that reads the instruction through MiniLM can know about the edit;
    the per-task oracle is told the edit instead.
    """
    def embed(data):
        return F.normalize(text_encoder.embed(list(data.instructions)).cpu(), dim=-1)

    single = (train_set.second_ids < 0).cpu()  # centroids from single-edit instructions only
    ids = train_set.edit_ids.cpu()[single]
    emb = embed(train_set)[single]
    centroids = F.normalize(torch.stack([emb[ids == k].mean(0) for k in ids.unique()]), dim=-1)
    keys = ids.unique()
    return [(keys[(embed(d) @ centroids.T).argmax(-1)] == d.edit_ids.cpu()).float().mean().item() for d in eval_sets]
