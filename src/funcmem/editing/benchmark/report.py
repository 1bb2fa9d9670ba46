"""Pictures and ``report.md`` for a benchmark run: what a person reads first."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plots import pyplot
from .findings import SPLIT_LABELS, findings
from .full_photos import write_full_photos

METHOD_LABELS = {"identity": "identity (input unchanged)", "base": "base editor", "shared_lora": "shared LoRA",
                 "shared_lora_matched": "shared LoRA (matched)", "per_task_lora": "per-task LoRA (told the edit)",
                 "retrieval_lora": "retrieval LoRA", "lora_sum": "lora_sum (told both edits)",
                 "functional_memory": "functional memory"}
READS = {"identity": "nothing", "base": "the instruction (MiniLM token states)", "shared_lora": "nothing (one LoRA)",
         "shared_lora_matched": "nothing (one LoRA)", "per_task_lora": "the first edit's label",
         "retrieval_lora": "the condition (nearest key of the bank)", "lora_sum": "both edits' labels",
         "functional_memory": "the condition (instruction + image), no label",
         "functional_memory[label]": "the first edit's label (read off its phrasing), no value",
         "functional_memory[label-value]": "every edit's label and value, parsed (an oracle told the answer)",
         "functional_memory[base-hidden]": "the frozen editor's own last-layer tokens"}


def edits_png(samples: dict, path: Path) -> None:
    """Rows = examples (one per edit, held-out values, compositions); columns = input, target and each
    method's output, with its PSNR to the target under each tile."""
    plt = pyplot()
    rows, cols = samples["rows"], samples["columns"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.5 * len(cols) + 1.6, 1.75 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, img in enumerate(row["images"]):
            ax = axes[r, c]
            ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c != 1:
                ax.set_xlabel(f"{row['psnr'][c]:.1f} dB", fontsize=7, labelpad=1)
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
        axes[r, 0].set_ylabel(row["edit"], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def conflict_png(conflict: dict, tasks: list[str], path: Path) -> None:
    plt = pyplot()
    steps = list(conflict["by_step"])
    fig, axes = plt.subplots(1, len(steps), figsize=(4.2 * len(steps), 4))
    axes = np.atleast_1d(axes)
    for ax, step in zip(axes, steps):
        m = np.array(conflict["by_step"][step]["matrix"])
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(tasks)), tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=7)
        ax.set_title(f"step {step}: inverse pairs {conflict['by_step'][step]['mean_inverse_pairs']:+.2f}", fontsize=9)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8, label="gradient cosine (shared LoRA)")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def manifold_png(points: dict, silhouette: float, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    cmap = plt.get_cmap("tab20")
    for ax, key in zip(axes, ("pca", "tsne")):
        xy = points[key]
        for k, name in enumerate(points["names"]):
            sel = points["labels"] == k
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(k), label=name)
        ax.set_title(f"generated LoRAs, {key.upper()} (silhouette {silhouette:.2f})", fontsize=10)
    axes[1].legend(fontsize=7, markerscale=2, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def scaling_png(scaling: dict, reference: dict, path: Path) -> None:
    """Functional memory's PSNR against generator depth and LoRA rank; ``reference``: one split's eval."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, label in ((axes[0], "depth", "generator depth"), (axes[1], "rank", "LoRA rank")):
        xs = sorted(scaling[key], key=float)
        ax.plot([float(x) for x in xs], [scaling[key][x] for x in xs], "o-", label="functional memory")
        for m, style in (("shared_lora", "--"), ("per_task_lora", ":")):
            if m in reference:
                ax.axhline(reference[m]["psnr"], linestyle=style, color="gray", label=METHOD_LABELS[m])
        ax.set_xlabel(label), ax.set_ylabel("PSNR, seen wording (dB)")
        ax.set_xticks([float(x) for x in xs])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


TRAINED_ONLY = ("identity", "base")  # not candidates for "best" in a table


def splits_table(results: dict) -> str:
    """Mean PSNR ± std over seeds (SSIM in brackets): methods by split; the best trained method in bold."""
    splits = list(results["eval"])
    methods = list(dict.fromkeys(m for s in splits for m in results["eval"][s]))
    rows = ["| method | reads | " + " | ".join(SPLIT_LABELS.get(s, s) for s in splits) + " |",
            "|---|---|" + "---|" * len(splits)]
    best = {s: max(v["psnr"] for k, v in results["eval"][s].items() if k not in TRAINED_ONLY) for s in splits}
    for m in methods:
        cells = []
        for s in splits:
            e = results["eval"][s].get(m)
            text = "" if e is None else f"{e['psnr']:.2f} ± {e['psnr_std']:.2f} ({e['ssim']:.3f})"
            cells.append(f"**{text}**" if e is not None and e["psnr"] == best[s] else text)
        rows.append(f"| {METHOD_LABELS.get(m, m)} | {READS.get(m, '')} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def per_edit_table(results: dict, split: str) -> str:
    """PSNR per edit (or pair) on one split, methods as columns, the best trained method in bold."""
    table = results["eval"][split]
    names = list(table)
    rows = ["| edit | " + " | ".join(METHOD_LABELS.get(n, n) for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for edit in next(iter(table.values()))["per_edit"]:
        vals = [table[n]["per_edit"][edit]["psnr"] for n in names]
        best = max(v for n, v in zip(names, vals) if n not in TRAINED_ONLY)
        rows.append(f"| {edit} | " + " | ".join(f"**{v:.2f}**" if v == best else f"{v:.2f}" for v in vals) + " |")
    return "\n".join(rows) + "\n"


def write_report(out: Path, results: dict, figures: dict) -> None:
    """The pictures and ``report.md`` of a run saved in ``out`` (``figures``: the run's ``figures.pt``)."""
    out = Path(out)
    edits_png(figures["samples"], out / "edits.png")
    conflict_png(results["gradient_conflict"], results["tasks"], out / "conflict.png")
    manifold_png(figures["manifold"], results["manifold"]["silhouette"], out / "manifold.png")
    if any(results["scaling"].values()):
        scaling_png(results["scaling"], results["eval"]["seen_wording"], out / "scaling.png")
    lines = [*_results_section(results), *write_full_photos(out, results), *_analysis_section(results),
             *_cost_section(results)]
    (out / "report.md").write_text("\n".join(lines))


def _results_section(results: dict) -> list[str]:
    """Title, setting, findings, the PSNR tables and the parameter counts."""
    p, cfg, sp = results["params"], results["config"], results["splits"]
    return [
        "# Functional memory on conflicting image edits",
        "",
        f"{len(results['tasks'])} edits in {len(results['inverse_pairs'])} inverse pairs, with values and compositions, "
        f"{cfg['size']} px crops of real photos, split by photo ({len(sp['train_photos'])} train / "
        f"{len(sp['test_photos'])} test photos; {sp['train_examples']} training examples, "
        + ", ".join(f"{n} {SPLIT_LABELS.get(s, s)}" for s, n in sp["test_examples"].items())
        + f" test examples). Every method: {cfg['steps']} steps, batch {cfg['batch']}, seeds {cfg['seeds']}, "
        f"condition `{results['condition']}`.",
        "",
        "## Findings",
        "",
        *[f"- {s}" for s in findings(results)],
        "",
        "## Test PSNR (dB) by split: mean ± std over seeds (SSIM)",
        "",
        splits_table(results),
        "On compositions `per_task_lora` is told the first edit only; `lora_sum` adds both edits' LoRAs.",
        "",
        "![edits](edits.png)",
        "",
        "Columns: the input, the target, then each method's output with its PSNR to the target; the bank column "
        "is told the edit (both edits' LoRAs added on compositions).",
        "",
        *[line for split in results["eval"] for line in
          (f"### Per edit, {SPLIT_LABELS.get(split, split)}", "", per_edit_table(results, split), "")],
        f"Trainable parameters: shared LoRA {p['shared_lora']:,} (rank {cfg['rank']}), "
        + (f"matched shared LoRA {p['shared_lora_matched']:,} (rank {p['shared_lora_matched_rank']}), "
           if "shared_lora_matched" in p else "")
        + f"per-task LoRAs {p['per_task_lora']:,}, "
        f"functional memory {p['functional_memory']:,} (generator + condition projector); "
        f"{p['generated_per_instance']:,} LoRA numbers generated per instance. Base editor {p['base_editor']:,}.",
        "",
    ]


def _analysis_section(results: dict) -> list[str]:
    """Routing, gradient conflict, manifold and scaling."""
    mf = results["manifold"]
    return [
        "## Conditional routing (PSNR, dB, seen wording)",
        "",
        "| matched | mismatched instruction | averaged condition | no LoRA |",
        "|---|---|---|---|",
        "| {matched:.2f} | {mismatched:.2f} | {averaged:.2f} | {no_lora:.2f} |".format(**results["routing"]),
        "",
        "## Gradient conflict of the shared LoRA",
        "",
        "| step | mean cosine, inverse pairs | mean cosine, all pairs |",
        "|---|---|---|",
        *[f"| {s} | {v['mean_inverse_pairs']:+.3f} | {v['mean_all_pairs']:+.3f} |"
          for s, v in results["gradient_conflict"]["by_step"].items()],
        "",
        "![conflict](conflict.png)",
        "",
        "## Parameter manifold",
        "",
        "On the generated weight updates s B A. "
        f"Silhouette by edit {mf['silhouette']:.3f} (on the first 50 principal components {mf['silhouette_pca50']:.3f}); "
        f"distance between inverse edits' centroids {mf['inverse_pair_distance']:.3g} vs {mf['mean_pair_distance']:.3g} "
        f"between any two edits' centroids; the first two components hold {100 * mf['pca_explained_2d']:.0f}% of the variance.",
        "",
        "![manifold](manifold.png)",
        "",
        *_value_section(mf.get("value_spearman")),
        *_scaling_section(results["scaling"]),
    ]


def _value_section(vs: dict | None) -> list[str]:
    """|Spearman| between the value an instruction names and the first principal component of that
    edit's generated updates (seen wording and held-out values)."""
    if not vs or not vs["per_edit"]:
        return []
    return ["| edit | samples | abs. Spearman(value, PC1 of the updates) |", "|---|---|---|",
            *[f"| {e} | {vs['samples'][e]} | {r:.2f} |" for e, r in vs["per_edit"].items()], ""]


def _scaling_section(scaling: dict) -> list[str]:
    """Generator depth and LoRA rank sweeps (absent from the quick run)."""
    if not any(scaling.values()):
        return []
    return [
        "## Scaling",
        "",
        "| generator depth | " + " | ".join(scaling["depth"]) + " |",
        "|---" * (len(scaling["depth"]) + 1) + "|",
        "| PSNR | " + " | ".join(f"{v:.2f}" for v in scaling["depth"].values()) + " |",
        "",
        "| LoRA rank | " + " | ".join(scaling["rank"]) + " |",
        "|---" * (len(scaling["rank"]) + 1) + "|",
        "| PSNR | " + " | ".join(f"{v:.2f}" for v in scaling["rank"].values()) + " |",
        "",
        "![scaling](scaling.png)",
        "",
    ]


def _cost_section(results: dict) -> list[str]:
    """Storage and timing."""
    st, t = results["storage"], results["timing"]
    return [
        "## Storage",
        "",
        f"Generator (+ projector) {st['functional_memory'] / 1e6:.2f} MB vs {st['num_tasks']} per-task LoRAs "
        f"{st['per_task_loras'] / 1e6:.2f} MB vs one shared LoRA {st['one_shared_lora'] / 1e6:.3f} MB (float32). "
        "The generator's size does not grow with the number of edits it serves.",
        "",
        "## Timing (seconds per stage)",
        "",
        *([f"The seeds after the first trained in {results['seed_processes'] - 1} more process(es) beside this one "
           "(stages below: this process; other_seeds_wait: waiting for them).", ""]
          if results.get("seed_processes", 1) > 1 else []),
        "| " + " | ".join(k for k in t if k != "edit_latency_ms") + " |",
        "|---" * (len(t) - 1) + "|",
        "| " + " | ".join(f"{v:.1f}" for k, v in t.items() if k != "edit_latency_ms") + " |",
        "",
        "Per-image latency (ms, frozen features given): generate {generate:.1f}, generate + edit "
        "{generate_and_edit:.1f}, base edit alone {base_edit:.1f}.".format(**t["edit_latency_ms"]),
        "",
    ]
