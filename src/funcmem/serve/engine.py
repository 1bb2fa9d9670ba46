"""The service's compute: a trained run, and one call that edits a batch of requests.

    engine = EditEngine(run_dir)
    engine.prepare(image, instruction)   -> Job          tiles at the training scale (cheap, any thread)
    engine.run([job, ...])               -> fills each job's ``lora`` and ``output``  (one thread)

A batch of requests is one list of tiles (each request contributes its image's tiles). Tiles whose
request has no cached LoRA go through condition encoders -> projector -> generator together; then
every tile goes through the frozen editor with its own LoRA mounted (the per-sample path).

Exactness: CPU matmul kernels may sum in a different order when the number of rows changes, so a
tile computed in a batch of 10 can differ in its last bits from the same tile computed alone. The
engine therefore runs every model in fixed-size *chunks* of ``chunk`` tiles, padding the last one
(with copies of its last tile). Each tile is then computed in a batch of exactly ``chunk`` rows
whatever else was batched with it, and a response is bit for bit the same under any load. Text
features are computed one instruction at a time for the same reason (they are cached per string).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..editing.apply import from_tiles, to_tiles
from ..editing.rundir import load_run, weight_files
from ..lora import LoRA
from ..mount import lora_path

TEXT_CACHE_LIMIT = 4096  # instructions whose text features the text encoder may keep


@dataclass(eq=False)
class Job:
    """One request inside the engine.

    Args:
        image: (3, H, W) in [0, 1], the decoded upload.
        instruction: the cleaned instruction.
        strength: multiplies the generated LoRA's B factors (0: the frozen editor alone).
        tiles: (n, 3, S, S) the image's tiles; grid: ``to_tiles``' grid.
        key: the LoRA cache key (None: not cached).
        want_output: False for a LoRA-only request (``/v1/lora``): the editor is skipped.

    Filled by ``EditEngine.run``: ``lora`` (n factor rows, unscaled by strength), ``output``
    (3, H, W), ``cache_hit``, ``batch_size`` (requests in its batch).
    """

    image: Tensor
    instruction: str
    strength: float = 1.0
    tiles: Tensor | None = None
    grid: tuple[int, int, int, int] | None = None
    key: str | None = None
    want_output: bool = True
    lora: LoRA | None = None
    output: Tensor | None = None
    cache_hit: bool = False
    batch_size: int = 0
    extra: dict = field(default_factory=dict)


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _pad(t: Tensor, rows: int) -> Tensor:
    """Pad dim 0 to ``rows`` with copies of the last row."""
    missing = rows - t.shape[0]
    return t if missing == 0 else torch.cat([t, t[-1:].expand(missing, *t.shape[1:])])


class EditEngine:
    """A loaded run and its batched edit.

    Args:
        run: a run directory (``funcmem demo`` output).
        chunk: tiles per model call (every call is padded to it; see the module doc).
        device: where the models run.
    """

    def __init__(self, run: str | Path, chunk: int = 16, device: str = "cpu"):
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        self.run_dir = Path(run)
        self.loaded = load_run(self.run_dir, device)
        self.memory = self.loaded.memory
        self.editor = self.loaded.editor
        self.encoder = self.loaded.encoder
        self.text_encoder = self.loaded.text_encoder
        self.size: int = self.loaded.size
        self.max_text_tokens: int = self.editor.config.max_text_tokens
        self.chunk = chunk
        self.device = torch.device(device)
        self.model_id = self._model_id()

    def _model_id(self) -> str:
        """A hash of the run's weights: part of every cache key."""
        h = hashlib.sha256()
        for file in weight_files(self.run_dir):
            h.update(file.read_bytes())
        return h.hexdigest()[:16]

    def cache_key(self, image_bytes: bytes, instruction: str) -> str:
        """sha256 of (image bytes, instruction, model)."""
        h = hashlib.sha256()
        for part in (image_bytes, instruction.encode(), self.model_id.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        return h.hexdigest()

    def prepare(self, image: Tensor, instruction: str, strength: float = 1.0, key: str | None = None,
                want_output: bool = True) -> Job:
        tiles, grid = to_tiles(image, self.size)
        return Job(image, instruction, strength, tiles, grid, key, want_output)

    # ---- the batch

    def _text(self, instructions: list[str]) -> tuple[Tensor, Tensor]:
        """Editor text states (B, T, 384) and mask, each instruction encoded on its own (cached)."""
        te = self.text_encoder
        for memo in (getattr(te, "_states", None), getattr(te, "_embeds", None)):  # bound its per-string caches
            if memo is not None and len(memo) > TEXT_CACHE_LIMIT:
                memo.clear()
        for text in dict.fromkeys(instructions):
            te.encode([text], self.max_text_tokens)
            te.encode([text], getattr(self.encoder, "max_tokens", self.max_text_tokens))
            te.embed([text])
        return te.encode(instructions, self.max_text_tokens)

    def generate(self, tiles: Tensor, instructions: list[str]) -> LoRA:
        """Generated LoRA rows for tiles (n, 3, S, S) and their instructions, in padded chunks."""
        parts = []
        for s, e in _chunks(len(tiles), self.chunk):
            x = _pad(tiles[s:e], self.chunk).to(self.device)
            texts = instructions[s:e] + [instructions[e - 1]] * (self.chunk - (e - s))
            lora = self.memory.fm.generate(self.memory.projector(self.encoder.raw(x, texts)))
            parts.append(lora[slice(0, e - s)].to("cpu"))
        return LoRA.cat(parts)

    def edit(self, tiles: Tensor, instructions: list[str], lora: LoRA) -> Tensor:
        """The editor on tiles (n, 3, S, S), sample i with LoRA row i mounted -> (n, 3, S, S)."""
        states, mask = self._text(instructions)
        out = []
        for s, e in _chunks(len(tiles), self.chunk):
            rows = lora[slice(s, e)]
            rows = LoRA({k: (_pad(a, self.chunk), _pad(b, self.chunk)) for k, (a, b) in rows.factors.items()},
                        rows.scale).to(self.device)
            args = (_pad(tiles[s:e], self.chunk), _pad(states[s:e], self.chunk), _pad(mask[s:e], self.chunk))
            # one row per sample, whatever the chunk (this thread only)
            with lora_path("per_sample"), self.memory.fm.mounted(rows):
                out.append(self.editor(*(a.to(self.device) for a in args))[: e - s].cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def run(self, jobs: list[Job], cache=None) -> None:
        """Fill every job's ``lora`` (from ``cache`` when it holds the key) and ``output``."""
        for job in jobs:
            job.batch_size = len(jobs)
            cached = cache.get(job.key) if cache is not None and job.key is not None else None
            if cached is not None:
                job.lora, job.cache_hit = cached, True
        todo = [j for j in jobs if j.lora is None]
        if todo:
            self._text([j.instruction for j in todo])
            lora = self.generate(torch.cat([j.tiles for j in todo]),
                                 [j.instruction for j in todo for _ in range(len(j.tiles))])
            start = 0
            for job in todo:
                n = len(job.tiles)
                job.lora = LoRA({k: (a[start:start + n].clone(), b[start:start + n].clone())
                                 for k, (a, b) in lora.factors.items()}, lora.scale)
                start += n
                if cache is not None and job.key is not None:
                    cache.put(job.key, job.lora)
        editing = [j for j in jobs if j.want_output]
        if not editing:
            return
        tiles = torch.cat([j.tiles for j in editing])
        instructions = [j.instruction for j in editing for _ in range(len(j.tiles))]
        lora = LoRA.cat([_scaled(j.lora, j.strength) for j in editing])
        edited = self.edit(tiles, instructions, lora)
        start = 0
        for job in editing:
            n = len(job.tiles)
            job.output = from_tiles(edited[start:start + n], job.tiles, job.grid, job.image)
            start += n


def _scaled(lora: LoRA, strength: float) -> LoRA:
    """The LoRA with its B factors times ``strength`` (the update scale * B A scales with it)."""
    if strength == 1.0:
        return lora
    return LoRA({k: (a, b * strength) for k, (a, b) in lora.factors.items()}, lora.scale)
