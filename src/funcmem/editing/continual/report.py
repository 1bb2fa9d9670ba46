"""``continual.png`` and ``continual.md``: a continual run's picture and report section."""

from __future__ import annotations

from pathlib import Path

from ..plots import pyplot

LABELS = {"shared_lora_sequential": "shared LoRA, sequential", "per_task_lora": "LoRA per stage (oracle label)",
          "fm_naive": "generator, naive fine-tune", "fm_replay": "generator + functional distillation"}


def plot(results: dict, path: Path) -> None:
    """Per method: each group's test PSNR after every stage (dashed: the base editor on that group)."""
    plt = pyplot()
    methods, stages = results["methods"], [s["name"] for s in results["stages"]]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.2), sharey=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (m, r) in zip(axes[0], methods.items()):
        for j, group in enumerate(stages):
            xs = list(range(j, len(stages)))
            ax.plot(xs, [r["matrix"][i][j] for i in xs], "o-", color=colours[j % len(colours)], label=f"group {group}")
            ax.axhline(results["base_psnr"][j], color=colours[j % len(colours)], ls="--", lw=0.8)
        ax.set_xticks(range(len(stages)), [f"after {s}" for s in stages], fontsize=8)
        ax.set_title(f"{LABELS.get(m, m)}\nforgetting {r['mean_forgetting']:.2f} dB", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test PSNR (dB); dashed: base editor")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB"


def report(results: dict) -> str:
    """``continual.md``: the run's continual-learning section."""
    stages = [s["name"] for s in results["stages"]]
    groups = ", ".join(f"{s['name']} = {' / '.join(s['edits'])}" for s in results["stages"])
    lines = ["## Continual learning", "",
             f"Groups taught one after another, each stage seeing only its own data: {groups}. "
             f"{results['config']['benchmark']['steps']} steps per stage and method, "
             f"batch {results['config']['benchmark']['batch']}. "
             "PSNR (dB) on each group's held-out test examples after every stage; forgetting = best minus final "
             "PSNR per earlier group (mean), BWT = mean final minus just-learnt PSNR over earlier groups.", "",
             "| method | average PSNR | forgetting | BWT | storage |", "|---|---|---|---|---|"]
    for m, r in results["methods"].items():
        st = r["storage"]
        extra = f" (weights {_kib(st['weights'])} + store {_kib(st['store'])})" if st["store"] else ""
        lines.append(f"| {LABELS.get(m, m)} | {r['average']:.2f} | {r['mean_forgetting']:.2f} | "
                     f"{r['backward_transfer']:+.2f} | {_kib(r['storage_bytes'])}{extra} |")
    lines += ["", f"Base editor alone: {', '.join(f'{g} {p:.2f}' for g, p in zip(stages, results['base_psnr']))}.", ""]
    for m, r in results["methods"].items():
        lines += [f"**{LABELS.get(m, m)}** (rows: after stage; columns: group)", "",
                  "| after | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
        for i, row in enumerate(r["matrix"]):
            lines.append(f"| {stages[i]} | " + " | ".join("" if v is None else f"{v:.2f}" for v in row) + " |")
        lines.append("")
    if "store" in results["methods"].get("fm_replay", {}):
        s = results["methods"]["fm_replay"]["store"]
        lines += [f"The replay store holds {s['conditions']} condition vectors ({s['per_edit']} per edit, shape "
                  f"{s['shape']}, {s['dtype']}) and their edit ids: {s['bytes']:,} bytes; no images.", ""]
    if "forget" in results:
        lines += forget_section(results["forget"])
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in results["timing"].items() if k != "total")
    lines += ["![per-group PSNR across stages](continual.png)", "",
              f"Wall time {results['timing']['total']:.0f} s ({parts}).", ""]
    return "\n".join(lines)


def forget_section(f: dict) -> list[str]:
    """The removal's table: PSNR (dB) before and after, on held-out and training wording."""
    near = ", ".join(f["near_miss_edits"]) or "none"
    how = ", ".join(f"{k}={v}" for k, v in f["neighbourhood"].items()) or "the stored conditions only"
    if f.get("gate"):
        how += "; behaviour gate " + ", ".join(f"{k}={v!r}" for k, v in f["gate"].items())
    rows = [("removed edits' output vs the base's, held-out wording and photos (high = removed)",
             f["removed_psnr_to_base_before"], f["removed_psnr_to_base"]),
            ("removed edits' output vs the base's, training wording",
             f["removed_psnr_to_base_seen_before"], f["removed_psnr_to_base_seen"]),
            (f"removed edits vs their targets (base editor: {f['base_psnr_removed']:.2f})",
             f["removed_psnr_to_target_before"], f["removed_psnr_to_target_after"]),
            ("kept edits vs their targets", f["kept_psnr_before"], f["kept_psnr_after"]),
            (f"near misses vs their targets ({near})", f["near_miss_psnr_before"], f["near_miss_psnr_after"])]
    return ["### Removing edits", "",
            f"`--forget {','.join(f['edits'])}`: {f['steps']} steps on the {f['store_conditions_used']} stored "
            f"conditions and their neighbourhood ({how}); "
            + ("no photo (the gate's probes are random colour fields)." if f.get("gate") else "no images."), "",
            "| PSNR (dB) | before | after |", "|---|---|---|",
            *[f"| {name} | {b:.2f} | {a:.2f} |" for name, b, a in rows], "",
            f"Undo (re-taught from the removed edits' stored vectors): {f['relearn_psnr']:.2f} dB to their targets "
            f"(before the removal {f['removed_psnr_to_target_before']:.2f}); kept edits then "
            f"{f['relearn_kept_psnr']:.2f}.", ""]
