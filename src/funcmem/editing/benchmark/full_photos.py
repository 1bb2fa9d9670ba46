"""``full_photos.png``: one whole test photo through ``funcmem edit``'s path with the run's functional
memory, before and after every edit of the family, and the report's paragraph on it.

The benchmark scores crops of the training size; this shows what a user gets from a whole photo:
it is cut into half-overlapping tiles at the training scale, every tile gets its own generated
LoRA, and the tiles' edits are cross-faded and added to the photo at its own size
(``editing.apply.edit_parts``). Every edit starts from the photo itself, except a restoration edit
(denoise, restore), which starts from the photo damaged as its training inputs are. Each result is
scored against the edit's exact target at the photo's size (the edit's op applied to the whole
photo), and by its seam score (``apply.seam_score``: the edit's steps across tile borders over its
steps across the editor's other patch borders; 1.0 = no seam).
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..apply import edit_parts, seam_score
from ..data import load_folder, load_photos
from ..metrics import psnr
from ..plots import pyplot
from ..ops import EDITS
from ..rundir import Run, load_run

MAX_SIDE = 384  # px: the photo's long side in the figure (its pixels are shown one for one)
COLUMNS = 4


def figure_photo(config: dict, name: str) -> Tensor:
    """A run's photo by name ((3, H, W) float in [0, 1]; from its ``--images`` folder, else the bundled
    ones), shrunk so its long side is at most ``MAX_SIDE``."""
    photos = load_folder(config["images"]) if config.get("images") else load_photos([name])
    image = next(p.image for p in photos if p.name == name)
    scale = MAX_SIDE / max(image.shape[-2:])
    if scale >= 1:
        return image
    size = [max(1, round(d * scale)) for d in image.shape[-2:]]
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def edit_photo(run: Run, photo: Tensor, edit: str) -> dict:
    """One edit of a whole photo (3, H, W) with its first training phrasing: ``before``, ``after``
    (3, H, W), their PSNR to the exact target, the seam score, the editor's patch size and the tile grid."""
    spec = EDITS[edit]
    value = "red" if spec.values is not None and spec.values.unit == "colour" else None  # as ``example`` words it
    before, target = spec.apply(photo, value, torch.Generator().manual_seed(0))
    after, delta, grid = edit_parts(run, before.permute(1, 2, 0), spec.example())
    after = after.permute(2, 0, 1)
    score = lambda x: float(psnr(x[None], target[None]))
    return {"edit": edit, "instruction": spec.example(), "before": before, "after": after,
            "damaged": not torch.equal(before, photo), "psnr_before": score(before), "psnr_after": score(after),
            "seam": seam_score(delta, grid.size, run.editor.config.patch), "patch": run.editor.config.patch, "grid": grid}


def panels(photo: Tensor, rows: list[dict]) -> list[tuple[str, Tensor]]:
    """(caption, (3, H, W)) in reading order: the photo once (the "before" of every edit that starts
    from it), then each edit's result, a restoration edit's damaged input just before it."""
    out = [("before: the photo", photo)]
    for r in rows:
        if r["damaged"]:
            out.append((f"before {r['edit']}: damaged", r["before"]))
        out.append((f"{r['edit']}: \"{r['instruction']}\"\n{r['psnr_before']:.1f} -> {r['psnr_after']:.1f} dB",
                    r["after"]))
    return out


def full_photos_png(items: list[tuple[str, Tensor]], path: Path) -> None:
    """The panels in a grid of ``COLUMNS``, each at about one figure pixel per photo pixel."""
    plt = pyplot()

    h, w = items[0][1].shape[-2:]
    n_rows = -(-len(items) // COLUMNS)
    dpi = 100
    fig, axes = plt.subplots(n_rows, COLUMNS, figsize=(COLUMNS * w / dpi, n_rows * (h / dpi + 0.45)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (caption, image) in zip(axes.flat, items):
        ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        ax.set_title(caption, fontsize=7)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def section(name: str, photo: Tensor, rows: list[dict], seconds: float) -> list[str]:
    """report.md's paragraph and table, every claim computed from ``rows``."""
    g = rows[0]["grid"]
    gains = [r["psnr_after"] - r["psnr_before"] for r in rows]
    worse = [r["edit"] for r, d in zip(rows, gains) if d < 0]
    seams = {r["edit"]: r["seam"] for r in rows if math.isfinite(r["seam"])}  # NaN: one tile, no border
    closer = (f"{len(rows) - len(worse)} of {len(rows)} results are closer to their target than their input was"
              + (f" (not {', '.join(worse)}: an edit is made at the training scale and resized up, which keeps a "
                 "per-pixel colour or tone map but not a change finer than that scale, such as grain)." if worse else "."))
    return [
        "## A whole photo",
        "",
        "![full photos](full_photos.png)",
        "",
        f"The test photo `{name}` ({photo.shape[-1]}x{photo.shape[-2]} px) edited through `funcmem edit`'s path by "
        f"the run's functional memory, with each edit's first training phrasing: {g.rows}x{g.cols} tiles of {g.size} px, "
        f"one every {g.stride} px, at {g.w}x{g.h} px, their edits cross-faded and added to the photo at its own size. "
        f"Under each result, its PSNR to the edit's exact target at that size, before -> after: the median gain is "
        f"{statistics.median(gains):+.1f} dB, and " + closer,
        (f"Seam score (mean step of the edit across tile borders / across the editor's other {rows[0]['patch']} px "
         f"patch borders; 1.0 = no seam): median {statistics.median(seams.values()):.2f}, largest "
         f"{max(seams.values()):.2f} ({max(seams, key=seams.get)})." if seams else "The photo is one tile: no tile border.")
        + f" The {len(rows)} edits took {seconds:.1f} s.",
        "",
        "| edit | instruction | PSNR before (dB) | after (dB) | seam score |",
        "|---|---|---|---|---|",
        *[f"| {r['edit']} | {r['instruction']} | {r['psnr_before']:.2f} | {r['psnr_after']:.2f} | {r['seam']:.2f} |"
          for r in rows],
        "",
    ]


def write_full_photos(out: Path, results: dict) -> list[str]:
    """Edit the run's first test photo with every edit of ``results["tasks"]`` using the run saved in
    ``out``; write ``out/full_photos.png`` and return report.md's lines about it."""
    start = time.perf_counter()
    run = load_run(out)
    name = results["splits"]["test_photos"][0]
    photo = figure_photo(results["config"], name)
    rows = [edit_photo(run, photo, edit) for edit in results["tasks"]]
    full_photos_png(panels(photo, rows), Path(out) / "full_photos.png")
    return section(name, photo, rows, time.perf_counter() - start)
