"""The base editor: shapes, identity at init, text padding mask, LoRA-able names, pretraining + cache."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from funcmem.editing import pretrain
from funcmem.editing.editor import Editor, EditorConfig

TINY = EditorConfig(image_size=16, patch=4, width=32, depth=2, heads=2, max_text_tokens=32)


def _inputs(cfg: EditorConfig, b: int = 2, t: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, cfg.image_size, cfg.image_size, generator=g)
    states = torch.randn(b, t, cfg.text_dim, generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, :3] = True
    mask[1, :5] = True
    return image, states, mask


def _trained(cfg=TINY):
    """An editor with its zero-initialised weights (head, adaLN) made random, so every path counts."""
    torch.manual_seed(0)
    editor = Editor(cfg)
    with torch.no_grad():
        for p in editor.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return editor


@pytest.mark.parametrize("size", [16, 32, 64])
def test_output_shape(size):
    cfg = EditorConfig(image_size=size, width=32, depth=1, heads=2)
    image, states, mask = _inputs(cfg)
    assert Editor(cfg)(image, states, mask).shape == image.shape


def test_untrained_editor_is_identity():
    image, states, mask = _inputs(TINY)
    assert torch.equal(Editor(TINY)(image, states, mask), image)


def test_padded_text_positions_do_not_matter():
    editor = _trained()
    image, states, mask = _inputs(TINY)
    changed = states.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    torch.testing.assert_close(editor(image, states, mask), editor(image, changed, mask))
    changed[0, 0] += 1.0  # a real token does matter
    assert not torch.allclose(editor(image, states, mask), editor(image, changed, mask))


def test_edit_clamps_to_unit_range():
    editor = _trained()
    image, states, mask = _inputs(TINY)
    out = editor.edit(image, states, mask)
    assert out.min() >= 0 and out.max() <= 1


def test_lora_target_names_are_linear():
    modules = dict(Editor(TINY).named_modules())
    for i in range(TINY.depth):
        for stream in ("img", "txt"):
            for slot in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                assert isinstance(modules[f"blocks.{i}.{stream}_{slot}"], nn.Linear)
    assert modules["blocks.0.img_attn.qkv"].out_features == 3 * TINY.width


def test_hidden_states_shapes():
    image, states, mask = _inputs(TINY)
    img, txt = Editor(TINY).hidden_states(image, states, mask)
    assert img.shape == (2, TINY.grid ** 2, TINY.width) and txt.shape == (2, 16, TINY.width)


def test_bad_shapes_raise():
    image, states, mask = _inputs(TINY)
    with pytest.raises(ValueError, match="image must be"):
        Editor(TINY)(image[:, :, :8], states, mask)
    with pytest.raises(ValueError, match="text_mask"):
        Editor(TINY)(image, states, mask.float())


def test_config_round_trip():
    assert EditorConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(ValueError, match="unknown"):
        EditorConfig.from_dict({"nope": 1})


def test_default_editor_is_small():
    assert 0.5e6 < Editor().count_parameters() < 1.5e6


def test_pretraining_lowers_the_loss(text_encoder):
    crops = pretrain.photo_crops(64, TINY.image_size)
    x, y, texts = pretrain._batch(crops, 64, list(pretrain.PRETRAIN_OPS), torch.Generator().manual_seed(1))
    states, mask = text_encoder.encode(texts, TINY.max_text_tokens)
    untrained = F.mse_loss(x, y)  # an untrained editor is the identity
    editor = pretrain.pretrain_editor(crops, TINY, steps=100, batch=16, lr=3e-3, text_encoder=text_encoder,
                                      progress=False)
    with torch.no_grad():
        assert F.mse_loss(editor(x, states, mask), y) < 0.6 * untrained  # about 0.35 seen


def test_pretraining_ops_keep_shape_and_range():
    x = torch.rand(2, 3, 8, 8)
    for name, (fn, phrasings) in pretrain.PRETRAIN_OPS.items():
        y = fn(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, name
        assert phrasings


def test_instructions_fit_the_default_token_budget(text_encoder):
    """The base's own phrasings, its out-of-family instructions and the benchmark's instructions
    (compositions with values and RGB colours are the longest) are never cut."""
    from funcmem.editing.tasks import SPLITS, sample_instance

    g = torch.Generator().manual_seed(0)
    texts = pretrain.instructions() + [pretrain.unknown_instruction(g) for _ in range(2000)]
    texts += [sample_instance(split, g).text for split in SPLITS for _ in range(500)]
    text_encoder.encode(texts, EditorConfig().max_text_tokens)
    assert not set(texts) & set(text_encoder.truncated)


def test_pretraining_batches_mix_the_family_with_unknown_instructions_kept_as_is():
    crops = pretrain.photo_crops(32, 16)
    x, y, texts = pretrain._batch(crops, 400, list(pretrain.PRETRAIN_OPS), torch.Generator().manual_seed(0))
    own = set(pretrain.instructions())
    unknown = [i for i, t in enumerate(texts) if t not in own]
    assert abs(len(unknown) / 400 - pretrain.UNKNOWN_SHARE) < 0.08
    assert all(torch.equal(x[i], y[i]) for i in unknown)


def test_load_or_train_trains_once_then_loads(tmp_path, monkeypatch, text_encoder):
    calls = []
    real = pretrain.pretrain_editor

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "pretrain_editor", counting)
    kwargs = dict(config=TINY, cache_dir=tmp_path, steps=3, batch=4, n_crops=16, text_encoder=text_encoder,
                  progress=False)
    first = pretrain.load_or_train_editor(**kwargs)
    second = pretrain.load_or_train_editor(**kwargs)
    assert len(calls) == 1
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]
    pretrain.load_or_train_editor(**{**kwargs, "seed": 1})  # other settings -> another checkpoint
    assert len(calls) == 2 and len(list(tmp_path.iterdir())) == 4


def test_unknown_config_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown EditorConfig fields \['colour'\]"):
        EditorConfig.from_dict({"width": 32, "colour": 1})


def test_pretraining_finds_every_instruction_prefetched():
    """The training loop's instructions were all encoded ahead, in chunks (the probe replays its draws)."""

    class Recording:
        def __init__(self):
            self.cache, self.calls = {}, []

        def encode(self, texts, max_tokens):
            new = [t for t in texts if t not in self.cache]
            self.calls.append((len(texts), len(new)))
            for t in new:
                self.cache[t] = torch.randn(max_tokens, TINY.text_dim) * 0.01
            return torch.stack([self.cache[t] for t in texts]), torch.ones(len(texts), max_tokens, dtype=torch.bool)

    encoder = Recording()
    crops = torch.rand(32, 3, TINY.image_size, TINY.image_size)
    pretrain.pretrain_editor(crops, TINY, steps=pretrain.PREFETCH_STEPS + 20, batch=8, text_encoder=encoder,
                             progress=False)
    training = [c for c in encoder.calls if c[0] == 8]  # the loop's per-batch calls
    assert len(training) == pretrain.PREFETCH_STEPS + 20 and all(new == 0 for _, new in training)
    assert sum(new for _, new in encoder.calls) == len(encoder.cache) > 8 * 20  # every text encoded once, ahead
