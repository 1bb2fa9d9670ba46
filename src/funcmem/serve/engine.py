"""The service's compute: a trained run, and one call that edits a batch of requests.

    engine = EditEngine(run_dir)
    engine.prepare(image, instruction)   -> Job          tiles at the training scale (cheap, any thread)
    engine.run([job, ...])               -> fills each job's ``lora`` and ``edited`` tiles  (one thread)
    engine.finish(job)                   -> the full-size edited image (any thread: pixel work stays
                                            off the model thread)

A batch of requests is one list of tiles (each request contributes its image's tiles). Tiles whose
request has no cached LoRA go through condition encoders -> projector -> generator together; then
every tile goes through the frozen editor with its own LoRA mounted (the per-sample path).

Exactness: CPU matmul kernels may sum in a different order when the number of rows changes, so a
tile computed in a batch of 10 can differ in its last bits from the same tile computed alone. The
engine therefore runs every model in fixed-size *chunks* of ``chunk`` tiles, padding the last one
(with copies of its last tile). Each tile is then computed in a batch of exactly ``chunk`` rows
whatever else was batched with it, and a response is bit for bit the same under any load. Text
features are computed one instruction at a time for the same reason (they are cached per string).

Bounded work: a request has at most ``max_tiles`` tiles (``editing.apply.tile_grid``; they overlap
by half, and ``finish`` cross-fades their edits), and the batch is walked ``chunk`` tiles at a
time; before each chunk, the tiles of requests whose deadline has passed (their caller already got
a 504) are dropped, so a timed-out request stops costing compute within one chunk. The full-size
image waits as uint8 and is edited in strips (``editing.apply.blend``).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..editing.apply import MAX_TILES, Grid, from_tiles, to_tiles
from ..editing.rundir import load_run, weight_files
from ..lora import LoRA
from ..mount import lora_path

TEXT_CACHE_LIMIT = 4096  # instructions whose text features the text encoder may keep


@dataclass(eq=False)
class Job:
    """One request inside the engine.

    Args:
        image: (H, W, 3) uint8, the decoded upload (kept compact: 3 bytes a pixel while it waits).
        instruction: the cleaned instruction.
        strength: multiplies the generated LoRA's B factors (0: the frozen editor alone).
        tiles: (n, 3, S, S) the image's tiles; grid: ``to_tiles``' grid.
        key: the LoRA cache key (None: not cached).
        want_output: False for a LoRA-only request (``/v1/lora``): the editor is skipped.
        deadline: ``time.monotonic()`` after which nobody waits for it: its remaining work is
            dropped at the next chunk boundary.

    Filled by ``EditEngine.run``: ``lora`` (n factor rows, unscaled by strength), ``edited``
    (n, 3, S, S) tiles, ``cache_hit``, ``batch_size`` (requests in its batch). A job that expired
    on the way gets neither ``lora`` nor ``edited``. ``EditEngine.finish`` makes the output image.
    """

    image: Tensor
    instruction: str
    strength: float = 1.0
    tiles: Tensor | None = None
    grid: Grid | None = None
    key: str | None = None
    want_output: bool = True
    deadline: float = math.inf
    lora: LoRA | None = None
    edited: Tensor | None = None
    cache_hit: bool = False
    batch_size: int = 0
    extra: dict = field(default_factory=dict)

    def expired(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) > self.deadline


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
        max_tiles: most tiles per request (``editing.apply.tile_grid``).
    """

    def __init__(self, run: str | Path, chunk: int = 16, device: str = "cpu", max_tiles: int = MAX_TILES):
        if chunk < 1 or max_tiles < 1:
            raise ValueError(f"chunk and max_tiles must be at least 1, got {chunk} and {max_tiles}")
        self.run_dir = Path(run)
        self.loaded = load_run(self.run_dir, device)
        self.memory = self.loaded.memory
        self.editor = self.loaded.editor
        self.encoder = self.loaded.encoder
        self.text_encoder = self.loaded.text_encoder
        self.size: int = self.loaded.size
        self.max_text_tokens: int = self.editor.config.max_text_tokens
        self.chunk, self.max_tiles = chunk, max_tiles
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
                want_output: bool = True, deadline: float = math.inf) -> Job:
        """A ``Job`` for an (H, W, 3) uint8 image: its tiles cut (cheap; any thread). Raises
        ``TooManyTiles`` when its side ratio needs more than ``max_tiles``."""
        tiles, grid = to_tiles(image, self.size, self.max_tiles)
        return Job(image, instruction, strength, tiles, grid, key, want_output, deadline)

    # ---- model calls on tiles

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
        self._text(instructions)
        parts = []
        for s, e in _chunks(len(tiles), self.chunk):
            x = _pad(tiles[s:e], self.chunk).to(self.device)
            texts = instructions[s:e] + [instructions[e - 1]] * (self.chunk - (e - s))
            lora = self.memory.fm.generate(self.memory.projector(self.encoder.raw(x, texts)))
            parts.append(lora[slice(0, e - s)].to("cpu"))
        return LoRA.cat(parts)

    def edit(self, tiles: Tensor, instructions: list[str], lora: LoRA) -> Tensor:
        """The editor on tiles (n, 3, S, S), sample i with LoRA row i mounted -> (n, 3, S, S)."""
        out = []
        for s, e in _chunks(len(tiles), self.chunk):
            states, mask = self._text(instructions[s:e])
            rows = lora[slice(s, e)]
            rows = LoRA({k: (_pad(a, self.chunk), _pad(b, self.chunk)) for k, (a, b) in rows.factors.items()},
                        rows.scale).to(self.device)
            args = (_pad(tiles[s:e], self.chunk), _pad(states, self.chunk), _pad(mask, self.chunk))
            # one row per sample, whatever the chunk (this thread only)
            with lora_path("per_sample"), self.memory.fm.mounted(rows):
                out.append(self.editor(*(a.to(self.device) for a in args))[: e - s].cpu())
        return torch.cat(out)

    # ---- a batch of jobs

    def _plan(self, jobs: list[Job]):
        """The batch's tiles, ``chunk`` at a time, as [(job, first row, end row)] runs; a job whose
        deadline passed is left out from the next chunk on (its caller has been answered)."""
        todo = [(job, i) for job in jobs for i in range(len(job.tiles))]
        pos = 0
        while pos < len(todo):
            now, part = time.monotonic(), []
            while pos < len(todo) and sum(e - s for _, s, e in part) < self.chunk:
                job, i = todo[pos]
                pos += 1
                if job.expired(now):
                    continue
                if part and part[-1][0] is job:
                    part[-1] = (job, part[-1][1], i + 1)
                else:
                    part.append((job, i, i + 1))
            if part:
                yield part

    @torch.inference_mode()
    def run(self, jobs: list[Job], cache=None) -> None:
        """Fill every live job's ``lora`` (from ``cache`` when it holds the key) and ``edited``."""
        for job in jobs:
            job.batch_size = len(jobs)
            cached = cache.get(job.key) if cache is not None and job.key is not None else None
            if cached is not None:
                job.lora, job.cache_hit = cached, True
        pieces = _collect(self._plan([j for j in jobs if j.lora is None]), lambda part: self.generate(
            torch.cat([job.tiles[s:e] for job, s, e in part]),
            [job.instruction for job, s, e in part for _ in range(s, e)]))
        for job, rows in pieces.items():
            if not job.expired():
                job.lora = LoRA.cat(rows)
                if cache is not None and job.key is not None:
                    cache.put(job.key, job.lora)
        editing = [j for j in jobs if j.want_output and j.lora is not None]
        pieces = _collect(self._plan(editing), lambda part: self.edit(
            torch.cat([job.tiles[s:e] for job, s, e in part]),
            [job.instruction for job, s, e in part for _ in range(s, e)],
            LoRA.cat([_scaled(job.lora[slice(s, e)], job.strength) for job, s, e in part])))
        for job, rows in pieces.items():
            if not job.expired():
                job.edited = torch.cat(rows)

    @staticmethod
    def finish(job: Job) -> Tensor:
        """A computed job's output: its tiles' edits, cross-faded, added to the full-size image, (H, W, 3) uint8."""
        return from_tiles(job.edited, job.tiles, job.grid, job.image)


def _collect(plan, compute) -> dict:
    """Run ``compute(part)`` on each part of a plan and split its rows back by job: {job: [rows, ...]}
    (only jobs whose every tile was computed)."""
    pieces: dict[Job, list] = {}
    for part in plan:
        out, k = compute(part), 0
        for job, s, e in part:
            pieces.setdefault(job, []).append(out[slice(k, k + e - s)])
            k += e - s
    return {job: rows for job, rows in pieces.items() if sum(len(r) for r in rows) == len(job.tiles)}


def _scaled(lora: LoRA, strength: float) -> LoRA:
    """The LoRA with its B factors times ``strength`` (the update scale * B A scales with it)."""
    if strength == 1.0:
        return lora
    return LoRA({k: (a, b * strength) for k, (a, b) in lora.factors.items()}, lora.scale)
