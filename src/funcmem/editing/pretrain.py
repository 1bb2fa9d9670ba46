"""Pre-training the base editor on its own edit family, once, with an on-disk cache.

The base editor learns geometric and colour-permutation edits (flips, rotations, inversion,
channel swaps, posterize, grayscale, roll, identity), and to return its input unchanged for a
neutral instruction ("keep it as is") or any instruction outside this family (objects, layout,
style, questions; with modifiers and values). These do NOT overlap the downstream family (blur,
noise, age, brightness, contrast, colour temperature, tint) that a generator later teaches it,
and none of its instructions uses a word of that family's language, so the frozen base does no
harm when it is given a benchmark instruction it does not know.

    photo_crops(...)            -> crops (n, 3, S, S)
    pretrain_editor(crops, ...) -> Editor                (AdamW, cosine LR, MSE on the raw output)
    load_or_train_editor(...)   -> frozen Editor         (cached: {cache}/editor-{hash}.safetensors + .json)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import file_sha256, read_json, read_safetensors, write_json, write_safetensors
from ..progress import progress as show_progress
from .editor import Editor, EditorConfig

VERSION = "editor-pretrain-3"  # bump when the ops, data, training loop or Editor architecture change

# ---------------------------------------------------------------- the pretraining edit family

Op = Callable[[Tensor], Tensor]  # (B, 3, S, S) -> (B, 3, S, S), values in [0, 1]


def _grayscale(x: Tensor) -> Tensor:
    y = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]  # (B, 1, S, S)
    return y.expand_as(x)


KEEP = ["keep it as is", "leave the image unchanged", "no change", "do nothing", "keep the photo exactly as it is",
        "leave the picture untouched", "don't edit anything", "leave it alone", "no edits please",
        "keep everything the same", "the image is good as it is", "nothing to do here"]
NEUTRAL = KEEP[0]  # the fixed instruction of the neutral-base ablation (``BenchmarkConfig.base_instruction``)

# Phrasings use no word of the benchmark's edits (no colour names either: the channel swaps count
# channels), so the base never learns the language it is later given; tests/editing/test_phrasings.py checks it.
PRETRAIN_OPS: dict[str, tuple[Op, list[str]]] = {
    "identity": (lambda x: x, KEEP),
    "flip_h": (lambda x: x.flip(-1), ["flip horizontally", "mirror the image left to right", "flip it left-right"]),
    "flip_v": (lambda x: x.flip(-2), ["flip vertically", "turn the image upside down by mirroring", "flip it top to bottom"]),
    "rotate_ccw": (lambda x: x.rot90(1, (-2, -1)), ["rotate 90 degrees counterclockwise", "turn it a quarter turn to the left"]),
    "rotate_180": (lambda x: x.rot90(2, (-2, -1)), ["rotate 180 degrees", "turn it half a turn"]),
    "rotate_cw": (lambda x: x.rot90(3, (-2, -1)), ["rotate 90 degrees clockwise", "turn it a quarter turn to the right"]),
    "invert": (lambda x: 1 - x, ["invert the colours", "make a negative of the image", "invert it"]),
    "swap_rb": (lambda x: x[:, [2, 1, 0]], ["swap the first and last channels", "reverse the channel order"]),
    "swap_rg": (lambda x: x[:, [1, 0, 2]], ["swap the first two channels", "exchange channels one and two"]),
    "posterize": (lambda x: (x * 3).round() / 3, ["posterize", "reduce to four levels per channel"]),
    "grayscale": (_grayscale, ["make it black and white", "convert to grayscale", "remove all colour"]),
    "roll": (lambda x: x.roll(x.shape[-1] // 2, -1), ["move the image sideways by half its width", "roll it sideways by half"]),
}

# Instructions outside the family: the base learns to return its input for them. Composed from
# requests an editor of this size cannot do (objects, layout, style, questions), with the
# modifiers and values benchmark instructions carry, so neither the syntax of a request nor a
# number or a "slightly" makes the base change anything.
_THINGS = ["a hat", "a dog", "a cat", "a small boat", "a bird", "a kite", "a tree", "a chair", "a clock", "a flag",
           "a palace", "a bicycle", "a robot", "a guitar", "a book", "a teacup", "a moustache", "a crown", "a balloon",
           "a horse", "an umbrella", "a lamp", "a ladder", "a fox", "two people"]
_PARTS = ["person", "car", "tree", "sign", "lettering", "logo", "watermark", "bird", "fence", "building", "people", "house",
          "boat", "dog", "face", "hat", "window", "cup", "table", "road"]
_PLACES = ["left side", "right side", "top", "bottom", "corner", "middle", "background", "foreground"]
_SCENES = ["a beach", "a forest", "a city street", "mountains", "a desert", "an ocean", "a field of flowers",
           "a football stadium", "outer space", "a library", "a train station", "a jungle"]
_STYLES = ["a cartoon", "a comic book", "an oil painting", "a pencil sketch", "a watercolor painting", "a sculpture",
           "a lego model", "an anime still", "a child's drawing", "a magazine cover", "a movie poster", "a tattoo design"]
_ARTISTS = ["van gogh", "monet", "picasso", "hokusai", "rembrandt", "warhol", "dali", "vermeer"]
_WORDS = ["hello", "happy birthday", "sale", "welcome", "the end", "good luck"]
_LANGUAGES = ["french", "german", "japanese", "spanish", "italian"]
_ADJECTIVES = ["realistic", "natural", "accurate", "consistent", "faithful", "true to life", "balanced", "lifelike"]
_TEMPLATES = [
    ("add {thing}", "thing"), ("add {thing} to the {place}", "thing place"), ("put {thing} in the {place}", "thing place"),
    ("remove the {part}", "part"), ("erase the {part} from the {place}", "part place"), ("delete the {part}", "part"),
    ("replace the background with {scene}", "scene"), ("move the {part} to the {place}", "part place"),
    ("make the {part} bigger", "part"), ("make the {part} smaller", "part"), ("zoom in on the {part}", "part"),
    ("crop to the {part}", "part"), ("turn the {part} into {thing}", "part thing"), ("make it look like {style}", "style"),
    ("redraw it as {style}", "style"), ("draw it in the style of {artist}", "artist"), ("in the style of {artist}", "artist"),
    ("write {word} at the {place}", "word place"), ("add a caption that says {word}", "word"),
    ("translate the {part} into {language}", "part language"), ("describe this picture", ""),
    ("what is in this image", ""), ("how many {part}s are there", "part"), ("who took this photo", ""),
    ("tell me a joke", ""), ("hello there", ""), ("count the {part}s", "part"), ("make the {part} smile", "part"),
    ("put the {part} next to {thing}", "part thing"), ("swap the {part} and the {part2}", "part part2"),
    # the benchmark's generic words (colour, tone, look, give, apply, decrease...) in requests it cannot do
    ("change the color of the {part}", "part"), ("make the {part} a different colour", "part"),
    ("what colour is the {part}", "part"), ("set the {part} to a colour of its own", "part"),
    ("copy the colors of the {part} onto the {part2}", "part part2"), ("give the {part} the tone of {style}", "part style"),
    ("give the image the look of {style}", "style"), ("apply a {style} filter to the {part}", "style part"),
    ("give it the feel of {style}", "style"), ("make the tones of the {part} match the {part2}", "part part2"),
    ("increase the size of the {part}", "part"), ("decrease the number of {part}s", "part"),
    ("reduce the {part} to an outline", "part"), ("raise the {part} a little higher", "part"),
    ("lower the {part} toward the {place}", "part place"), ("add {thing} to this picture", "thing"),
    ("remove the {part} from the photo", "part"), ("turn the {part} around", "part"),
    ("put a {style} effect on the {part}", "style part"), ("make the photo look like {style}", "style"),
    ("make the colors of the {part} more {adj}", "part adj"), ("make the colors of the image {adj}", "adj"),
    ("change the colors of the {part} to match {style}", "part style"), ("revert the {part} to the previous version", "part"),
    ("reset the {part}", "part"), ("give the {part} the colors of {style}", "part style"),
]
_MODIFIERS = ["", "", "", " slightly", " a bit", " a lot", " strongly", " please", " by {n}%", " by {n} px", " by {n}"]


def unknown_instruction(g: torch.Generator) -> str:
    """A random instruction outside the base's family (and outside the benchmark's language):
    a request from ``_TEMPLATES``, a modifier or value, and one time in five two requests joined by "and"."""
    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    def request() -> str:
        template, slots = pick(_TEMPLATES)
        fill = {"thing": pick(_THINGS), "place": pick(_PLACES), "part": pick(_PARTS), "part2": pick(_PARTS),
                "scene": pick(_SCENES), "style": pick(_STYLES), "artist": pick(_ARTISTS), "word": pick(_WORDS),
                "language": pick(_LANGUAGES), "adj": pick(_ADJECTIVES)}
        n = pick([5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80, 100, 120, 150, 200, 1, 2, 3])
        return template.format(**fill) + pick(_MODIFIERS).format(n=n)

    text = request()
    if float(torch.rand((), generator=g)) < 0.2:
        text = f"{text} and {request()}"
    return text


def instructions() -> list[str]:
    """Every phrasing of every pretraining op (the unknown instructions are drawn at random)."""
    return [p for _, phrasings in PRETRAIN_OPS.values() for p in phrasings]


# ---------------------------------------------------------------- training images

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")  # scikit-image sample photos (colour)


def photo_crops(n: int, size: int = 32, seed: int = 0, photos: tuple[str, ...] = PHOTOS) -> Tensor:
    """Random square crops of scikit-image photos, resized to ``size``: (n, 3, size, size) in [0, 1].

    Crop sides are drawn between ``size`` and half the photo's short side, then resized with
    antialiasing, so crops range from full-resolution detail to whole-object views.
    """
    import skimage.data

    g = torch.Generator().manual_seed(seed)
    images = [torch.from_numpy(getattr(skimage.data, name)()[..., :3].copy()).permute(2, 0, 1).float() / 255
              for name in photos]
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = images[int(torch.randint(len(images), (1,), generator=g))]
        h, w = img.shape[-2:]
        side = int(torch.randint(size, max(size, min(h, w) // 2) + 1, (1,), generator=g))
        top = int(torch.randint(h - side + 1, (1,), generator=g))
        left = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = img[None, :, top: top + side, left: left + side]
        out[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.clamp(0, 1)


def smooth_images(n: int, size: int = 32, seed: int = 0) -> Tensor:
    """Random smooth colour fields (low-res noise upsampled): (n, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# ---------------------------------------------------------------- training


UNKNOWN_SHARE = 0.5  # share of pretraining samples with an out-of-family instruction and the input as target


def _draw(n_crops: int, batch: int, names: list[str], g: torch.Generator,
          unknown_share: float = UNKNOWN_SHARE) -> tuple[Tensor, list[int], list[bool], list[str]]:
    """What a batch is made of, drawn from ``g`` alone: crop rows (B,), op indices, which samples get
    an out-of-family instruction, and the instructions (``unknown_instruction`` or one of the op's
    phrasings). The ops are deterministic, so replaying these draws replays the batch."""
    rows = torch.randint(n_crops, (batch,), generator=g)
    ops = torch.randint(len(names), (batch,), generator=g).tolist()
    unknown = (torch.rand(batch, generator=g) < unknown_share).tolist()
    texts = []
    for k, off_family in zip(ops, unknown):
        if off_family:
            texts.append(unknown_instruction(g))
        else:
            phrasings = PRETRAIN_OPS[names[k]][1]
            texts.append(phrasings[int(torch.randint(len(phrasings), (1,), generator=g))])
    return rows, ops, unknown, texts


def _batch(crops: Tensor, batch: int, names: list[str], g: torch.Generator,
           unknown_share: float = UNKNOWN_SHARE) -> tuple[Tensor, Tensor, list[str]]:
    """A random batch: inputs, targets (B, 3, S, S) and one instruction per sample: with probability
    ``unknown_share`` an out-of-family instruction (``unknown_instruction``, target = input), else a
    random op of ``names`` with one of its phrasings."""
    rows, ops, unknown, texts = _draw(len(crops), batch, names, g, unknown_share)
    x = crops[rows]
    y = x.clone()
    for i, (k, off_family) in enumerate(zip(ops, unknown)):
        if not off_family:
            y[i] = PRETRAIN_OPS[names[k]][0](x[i: i + 1])[0]
    return x, y, texts


PREFETCH_STEPS = 100  # the next steps' instructions are encoded together (sorted by length: 2.8x faster than per batch)


def _prefetch_texts(text_encoder, n_crops: int, batch: int, names: list[str], probe: torch.Generator, steps: int,
                    max_tokens: int) -> None:
    """Encode the instructions of the next ``steps`` batches ahead (``probe`` replays the training
    generator's draws) in one call, which ``TextEncoder`` runs in chunks of similar length, so the
    training loop finds them in the encoder's cache; encoding each batch's few new texts with their
    padding cost a quarter of pretraining."""
    text_encoder.encode(sorted({t for _ in range(steps) for t in _draw(n_crops, batch, names, probe)[3]}), max_tokens)


def pretrain_editor(crops: Tensor, config: EditorConfig | None = None, steps: int = 1500, batch: int = 16,
                    lr: float = 2e-3, seed: int = 0, text_encoder=None, progress: bool = True,
                    losses: list[float] | None = None) -> Editor:
    """Train a fresh editor on the pretraining ops (``PRETRAIN_OPS``).

    Args:
        crops: (n, 3, S, S) training images in [0, 1], S = ``config.image_size``.
        config: editor size (default ``EditorConfig()``).
        steps, batch, lr: AdamW steps, batch size and peak learning rate (cosine decay, short warmup).
        seed: initialisation and batch sampling.
        text_encoder: a ``TextEncoder`` (default: load MiniLM).
        progress: show progress (``funcmem.progress``).
        losses: if given, each step's loss is appended to it.

    Returns:
        the trained editor in train mode, on the crops' device (not frozen; see ``load_or_train_editor``).
    """
    config = config or EditorConfig()
    if crops.dim() != 4 or crops.shape[1:] != (3, config.image_size, config.image_size):
        raise ValueError(f"crops must be (n, 3, {config.image_size}, {config.image_size}), got {tuple(crops.shape)}")
    if text_encoder is None:
        from .conditions import TextEncoder

        text_encoder = TextEncoder()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        editor = Editor(config).to(crops.device)
    g = torch.Generator().manual_seed(seed)
    names = list(PRETRAIN_OPS)
    opt = torch.optim.AdamW(editor.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    editor.train()
    pool, device = crops.cpu(), crops.device
    bar = show_progress(range(steps), disable=not progress, desc="pretrain editor")
    probe = torch.Generator().manual_seed(seed)  # runs PREFETCH_STEPS ahead of ``g``
    for step in bar:
        if step % PREFETCH_STEPS == 0:
            _prefetch_texts(text_encoder, len(pool), batch, names, probe, min(PREFETCH_STEPS, steps - step),
                            config.max_text_tokens)
        x, y, texts = _batch(pool, batch, names, g)
        states, mask = text_encoder.encode(texts, config.max_text_tokens)
        x, y = x.to(device), y.to(device)
        loss = F.mse_loss(editor(x, states.to(device), mask.to(device)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(editor.parameters(), 1.0)
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return editor


# ---------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """``$FUNCMEM_CACHE`` or ``~/.cache/funcmem``."""
    return Path(os.environ.get("FUNCMEM_CACHE") or Path.home() / ".cache" / "funcmem")


def _freeze(editor: Editor) -> Editor:
    editor.eval()
    for p in editor.parameters():
        p.requires_grad_(False)
    return editor


def load_or_train_editor(config: EditorConfig | None = None, cache_dir: str | Path | None = None,
                         steps: int = 1500, batch: int = 16, lr: float = 2e-3, seed: int = 0,
                         n_crops: int = 4096, text_encoder=None, progress: bool = True) -> Editor:
    """The pretrained base editor, frozen and in eval mode: loaded from the cache, or trained
    (on ``photo_crops(n_crops)`` + ``smooth_images(n_crops // 8)``) and cached.

    The checkpoint is keyed by a hash of the editor config, these settings and ``VERSION``, and
    written atomically, so an interrupted run never leaves a half-written checkpoint behind.

    Args:
        config: editor size (default ``EditorConfig()``).
        cache_dir: default ``default_cache_dir()``.
        steps, batch, lr, seed, n_crops: pretraining settings (part of the cache key).
        text_encoder: a ``TextEncoder`` (default: load MiniLM) used only when training.
        progress: show progress while training (``funcmem.progress``).
    """
    config = config or EditorConfig()
    settings = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "n_crops": n_crops,
                "photos": list(PHOTOS), "ops": list(PRETRAIN_OPS), "unknown_share": UNKNOWN_SHARE}
    record = {"version": VERSION, "config": config.to_dict(), "settings": settings}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, meta = cache / f"editor-{key}.safetensors", cache / f"editor-{key}.json"
    if weights.is_file() and meta.is_file():
        try:  # the index records the weights' SHA-256: a mismatched or damaged pair is retrained, never used
            cached = read_json(meta)
            if cached.get("sha256") not in (None, file_sha256(weights)):
                raise ValueError(f"{weights} does not match the checksum in {meta}")
            editor = Editor(EditorConfig.from_dict(cached["config"]))
            editor.load_state_dict(read_safetensors(weights))
            return _freeze(editor)
        except (ValueError, KeyError, RuntimeError) as e:
            warnings.warn(f"ignoring the cached base editor ({e}); training it again", stacklevel=2)
    size = config.image_size
    crops = torch.cat([photo_crops(n_crops, size, seed), smooth_images(n_crops // 8, size, seed)])
    start = time.perf_counter()
    editor = pretrain_editor(crops, config, steps, batch, lr, seed, text_encoder, progress)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    write_safetensors(weights, editor.state_dict(), metadata={"key": key})
    record["sha256"] = file_sha256(weights)  # what is on disk now (another process may have renamed its copy in)
    write_json(meta, record)  # written last: its presence marks a complete checkpoint
    return _freeze(editor)
