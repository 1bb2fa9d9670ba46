"""The report's findings: sentences computed from ``results.json``, each claim made only when its
numbers support it, each margin set against the spread over seeds.

A margin between two methods counts as a difference when it exceeds ``noise``: twice the
combined standard deviation over seeds, sqrt(std_a^2 + std_b^2), and at least ``MIN_MARGIN`` dB
(with one seed there is no spread, so only the floor applies and the sentence says "one seed").
"""

from __future__ import annotations

import math

MIN_MARGIN = 0.1  # dB: below this two means are a tie whatever the seeds say
LABELS = {"identity": "the input unchanged (identity)", "base": "the frozen base", "shared_lora": "the shared LoRA",
          "shared_lora_matched": "the matched shared LoRA", "per_task_lora": "the bank (told the edit)",
          "retrieval_lora": "retrieval from the bank", "lora_sum": "lora_sum (both edits' LoRAs added, told both)",
          "functional_memory": "functional memory"}
SPLIT_LABELS = {"seen_wording": "seen wording", "held_out_wording": "held-out wording",
                "held_out_values": "held-out values", "held_out_compositions": "held-out compositions"}
GOALS = (  # the goals: (split, method, rival, required margin in dB)
    ("seen_wording", "functional_memory", "identity", 2.0), ("seen_wording", "functional_memory", "best_shared", 1.0),
    ("seen_wording", "functional_memory", "retrieval_lora", 0.0),
    ("held_out_values", "functional_memory", "per_task_lora", 1.0),
    ("held_out_values", "functional_memory", "retrieval_lora", 1.0),
    ("held_out_compositions", "functional_memory", "per_task_lora", 1.0),
    ("held_out_compositions", "functional_memory", "retrieval_lora", 1.0))


def entry(results: dict, split: str, method: str) -> dict | None:
    """``eval[split][method]``; "best_shared" is the better of the two shared LoRAs."""
    table = results["eval"].get(split, {})
    if method == "best_shared":
        shared = [table[m] for m in ("shared_lora", "shared_lora_matched") if m in table]
        return max(shared, key=lambda e: e["psnr"]) if shared else None
    return table.get(method)


def compare(results: dict, split: str, a: str, b: str) -> tuple[float, float] | None:
    """(margin a - b in dB, noise in dB) on a split, or None when either is missing."""
    ea, eb = entry(results, split, a), entry(results, split, b)
    if ea is None or eb is None:
        return None
    spread = 2 * math.hypot(ea.get("psnr_std", 0.0), eb.get("psnr_std", 0.0))
    return ea["psnr"] - eb["psnr"], max(MIN_MARGIN, spread)


def verdict(margin: float, noise: float) -> str:
    """"above" / "below" when the margin exceeds the noise, else "level with"."""
    return "above" if margin > noise else "below" if margin < -noise else "level with"


def _seeds(results: dict) -> str:
    n = len(results["config"]["seeds"])
    return "one seed, no spread measured" if n == 1 else f"{n} seeds; a margin counts when it exceeds twice the seeds' spread"


def base_sentence(results: dict) -> str:
    """Does the frozen base harm images? base - identity on every split."""
    gaps = {s: c[0] for s in results["eval"] if (c := compare(results, s, "base", "identity")) is not None}
    worst, best = min(gaps, key=gaps.get), max(gaps, key=gaps.get)
    if gaps[worst] >= -0.5:
        return (f"The frozen base does no harm: base - identity ranges from {gaps[worst]:+.2f} dB "
                f"({SPLIT_LABELS.get(worst, worst)}) to {gaps[best]:+.2f} dB ({SPLIT_LABELS.get(best, best)}).")
    return (f"**The frozen base harms images:** on {SPLIT_LABELS.get(worst, worst)} it is {-gaps[worst]:.2f} dB below "
            "returning the input unchanged.")


def split_sentence(results: dict, split: str) -> str | None:
    """Functional memory against each other method on one split, with the margins."""
    if entry(results, split, "functional_memory") is None:
        return None
    parts = []
    for rival in ("identity", "best_shared", "per_task_lora", "retrieval_lora", "lora_sum"):
        c = compare(results, split, "functional_memory", rival)
        if c is None:
            continue
        name = "the better shared LoRA" if rival == "best_shared" else LABELS[rival]
        parts.append(f"{verdict(*c)} {name} ({c[0]:+.2f} dB, noise {c[1]:.2f})")
    fm = entry(results, split, "functional_memory")
    return f"{SPLIT_LABELS.get(split, split).capitalize()}: functional memory ({fm['psnr']:.2f} dB) is " + "; ".join(parts) + "."


def wins_sentence(results: dict, split: str, rival: str = "per_task_lora") -> str | None:
    """The edits (or pairs) on which functional memory beats ``rival`` by more than the seeds' spread."""
    fm, other = entry(results, split, "functional_memory"), entry(results, split, rival)
    if fm is None or other is None or not fm.get("per_edit"):
        return None
    wins = []
    for edit, e in fm["per_edit"].items():
        o = other["per_edit"].get(edit)
        if o is not None:
            margin = e["psnr"] - o["psnr"]
            if margin > max(MIN_MARGIN, 2 * math.hypot(e.get("psnr_std", 0.0), o.get("psnr_std", 0.0))):
                wins.append(f"{edit} ({margin:+.2f} dB)")
    return (f"On {SPLIT_LABELS.get(split, split)} functional memory beats {LABELS[rival]} on {len(wins)} of "
            f"{len(fm['per_edit'])}" + (": " + ", ".join(wins) if wins else "") + ".")


def goal_sentences(results: dict) -> list[str]:
    """The issue's goals, each met or not, with the margin that decides it."""
    out = []
    for split, a, b, need in GOALS:
        c = compare(results, split, a, b)
        if c is None:
            continue
        margin, noise = c
        met = margin > max(need, noise) if need else margin >= -noise  # ">=": not below by more than the noise
        name = "the better shared LoRA" if b == "best_shared" else LABELS[b]
        out.append(f"Goal {'met' if met else '**not met**'}: functional memory "
                   + (f">= {name}" if need == 0 else f"> {name} + {need:g} dB")
                   + f" on {SPLIT_LABELS[split]} (margin {margin:+.2f} dB, noise {noise:.2f}).")
    return out


LABEL_ROW = "functional_memory[label]"


def fit_sentence(results: dict) -> str | None:
    """The generator told the edit (``functional_memory[label]``) against the bank told the edit, on
    training examples (fit) and on each split: can one generator fit as the bank does, and how much of
    the gap to the main row is understanding the condition rather than fitting?"""
    parts = []
    train = results.get("methods_train", {})
    if LABEL_ROW in train and "per_task_lora" in train:
        parts.append(f"training examples {train[LABEL_ROW]['psnr'] - train['per_task_lora']['psnr']:+.2f} dB")
    for split in results["eval"]:
        if (c := compare(results, split, LABEL_ROW, "per_task_lora")) is not None:
            parts.append(f"{SPLIT_LABELS.get(split, split)} {c[0]:+.2f} dB ({verdict(*c)}, noise {c[1]:.2f})")
    if not parts:
        return None
    text = "Told the edit, the generator against the bank told the edit: " + "; ".join(parts) + "."
    gaps = {s: c[0] for s in results["eval"] if (c := compare(results, s, LABEL_ROW, "functional_memory")) is not None}
    if gaps:
        worst = max(gaps, key=gaps.get)
        where = SPLIT_LABELS.get(worst, worst)
        text += (f" Being told the edit is worth up to {gaps[worst]:.2f} dB over reading the condition ({where}): what the "
                 "condition does not let the generator know." if gaps[worst] > MIN_MARGIN else
                 " Reading the condition does as well as being told the edit on every split "
                 f"(largest gap {gaps[worst]:+.2f} dB).")
    return text


VALUE_ROW = "functional_memory[label-value]"
ORACLES = ("per_task_lora", VALUE_ROW)  # told the answer: the edit (the bank), or the edit and its value (parsed)
TEACHES = 2.0  # dB over identity that an edit's oracle must reach for the edit to teach something
TRAINING_VALUE_SPLITS = ("seen_wording", "held_out_wording")  # single edits with the training values


def value_sentence(results: dict) -> str | None:
    """The generator told every edit and its value (``functional_memory[label-value]``) against the bank
    told the edit, on held-out values and compositions, and against ``lora_sum``: what a condition that
    carries the value exactly lets one generator do where no bank can list the instance."""
    parts = []
    for split, rival in (("held_out_values", "per_task_lora"), ("held_out_values", "retrieval_lora"),
                         ("held_out_compositions", "per_task_lora"), ("held_out_compositions", "lora_sum")):
        if (c := compare(results, split, VALUE_ROW, rival)) is not None:
            parts.append(f"{verdict(*c)} {LABELS[rival]} on {SPLIT_LABELS[split]} ({c[0]:+.2f} dB, noise {c[1]:.2f})")
    if not parts:
        return None
    text = "Told each edit and its value (parsed from the instruction), the generator is " + "; ".join(parts) + "."
    if (c := compare(results, "held_out_values", VALUE_ROW, "functional_memory")) is not None and c[0] > c[1]:
        text += (f" Reading the value from the instruction's encoders instead costs {c[0]:.2f} dB on held-out values: "
                 "what the language encoders do not pass on.")
    return text


def _oracle_gains(results: dict, splits: tuple[str, ...]) -> dict[str, float]:
    """Per edit, the smallest gain over identity of its better oracle (``ORACLES``) across ``splits``."""
    gains: dict[str, float] = {}
    for split in splits:
        ident = entry(results, split, "identity")
        oracles = [e for m in ORACLES if (e := entry(results, split, m)) is not None]
        if ident is None or not oracles:
            continue
        for edit, e in ident["per_edit"].items():
            best = max(o["per_edit"][edit]["psnr"] for o in oracles if edit in o["per_edit"]) - e["psnr"]
            gains[edit] = min(gains.get(edit, math.inf), best)
    return gains


def oracle_sentence(results: dict) -> str | None:
    """Does every edit teach something? An edit teaches when its better oracle (``ORACLES``) gains
    ``TEACHES`` dB or more over identity with the training values (seen and held-out wording); held-out
    values, where the bank is not told the value, are reported beside it."""
    gains = _oracle_gains(results, TRAINING_VALUE_SPLITS)
    if not gains:
        return None
    short = {e: g for e, g in gains.items() if g < TEACHES}
    low = min(gains, key=gains.get)
    told_value = any(entry(results, s, VALUE_ROW) is not None for s in TRAINING_VALUE_SPLITS)
    oracle = "the bank, or the generator told the value" if told_value else "the bank told the edit"
    text = (f"Every edit teaches something: its oracle ({oracle}) gains at least "
            f"{TEACHES:g} dB over identity on seen and held-out wording (smallest: {low}, {gains[low]:+.2f} dB)."
            if not short else
            f"**{len(short)} of {len(gains)} edits teach less than {TEACHES:g} dB** (the smallest gain over identity of "
            f"{oracle}, on seen and held-out wording): " + ", ".join(f"{e} {g:+.2f}" for e, g in sorted(short.items()))
            + ("." if told_value else "; this run has no generator told the value (`--condition encoders,label-value` "
                                       "adds it), the oracle of a value no bank is told."))
    held = _oracle_gains(results, ("held_out_values",))
    if held:
        below = sorted(e for e, g in held.items() if g < TEACHES)
        text += (f" On held-out values the oracle gains {min(held.values()):+.2f} to {max(held.values()):+.2f} dB"
                 + (f" ({len(below)} of {len(held)} edits under {TEACHES:g}: {', '.join(below)})." if below else "."))
    return text


def probe_sentence(results: dict) -> str | None:
    probe = results.get("instruction_probe")
    if not probe:
        return None
    return (f"The instruction alone names its edit for {100 * probe['held_out_phrasings']:.0f}% of held-out phrasings "
            f"and {100 * probe['seen_phrasings']:.0f}% of seen ones (nearest MiniLM training centroid): the ceiling of "
            "instruction understanding for any method that reads MiniLM.")


def conflict_sentence(results: dict) -> str | None:
    """Gradient conflict at init / half / end, with what stationarity implies."""
    g = results.get("gradient_conflict")
    if not g:
        return None
    steps = sorted(g["by_step"], key=int)
    start, end = g["by_step"][steps[0]], g["by_step"][steps[-1]]
    text = ("Gradient cosine of the shared LoRA between inverse edits: "
            + ", ".join(f"{g['by_step'][s]['mean_inverse_pairs']:+.2f} at step {s}" for s in steps)
            + f" (all pairs {start['mean_all_pairs']:+.2f} -> {end['mean_all_pairs']:+.2f}). ")
    if start["mean_inverse_pairs"] > 0 >= end["mean_inverse_pairs"]:
        text += ("Inverse edits agree at initialisation and conflict only at the end: near a converged sum of losses "
                 "the per-edit gradients must nearly cancel, which forces negative cosines, so the end value is not "
                 "evidence of conflict by itself.")
    elif end["mean_inverse_pairs"] < 0 and start["mean_inverse_pairs"] <= 0:
        text += "Inverse edits conflict from initialisation on, not only where the summed gradient vanishes."
    else:
        text += "Inverse edits do not conflict on average at the end of training."
    return text


def manifold_sentence(results: dict) -> str | None:
    m = results.get("manifold")
    if not m:
        return None
    s = m["silhouette"]
    text = (f"Generated updates {'cluster' if s > 0.1 else '**cluster only weakly**' if s > 0 else '**do not cluster**'} "
            f"by edit (silhouette {s:.2f}).")
    vs = m.get("value_spearman") or {}
    if vs.get("mean") is not None:
        rho, n = vs["mean"], len(vs["per_edit"])
        strong = sum(r >= 0.7 for r in vs["per_edit"].values())
        text += (f" Within an edit, the first principal component of the updates "
                 f"{'follows' if rho >= 0.7 else 'partly follows' if rho >= 0.4 else '**does not follow**'} the value the "
                 f"instruction names (mean |Spearman| {rho:.2f} over {n} edits; {strong} of {n} at 0.7 or more).")
    return text


def findings(results: dict) -> list[str]:
    """Every finding, in the report's order."""
    out = [f"Seeds: {_seeds(results)}.", base_sentence(results)]
    out += [s for split in results["eval"] if (s := split_sentence(results, split))]
    out += [s for split in results["eval"] if (s := wins_sentence(results, split))]
    out += goal_sentences(results)
    more = (oracle_sentence(results), fit_sentence(results), value_sentence(results), probe_sentence(results),
            conflict_sentence(results), manifold_sentence(results))
    out += [s for s in more if s]
    return out
