"""Condition encoders load offline and behave; the projector's shapes and LayerNorm statistics."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
import torch.nn.functional as F

from funcmem.editing.conditions import (BaseHiddenEncoder, ConditionEncoder, ConditionProjector, ImageEncoder,
                                        MiniLMEfficientNet)
from funcmem.editing.editor import Editor, EditorConfig


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder()


def test_embed_is_mean_pooled_and_unit_norm(text_encoder):
    texts = ["brighten the photo", "darken the photo"]
    emb = text_encoder.embed(texts)
    assert emb.shape == (2, 384)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    tok = text_encoder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = text_encoder.model(**tok).last_hidden_state
    m = tok["attention_mask"][..., None].float()
    expected = F.normalize((states * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(emb, expected, atol=1e-5, rtol=1e-5)
    cos = float(emb[0] @ emb[1])
    assert 0 < cos < 0.95


def test_encode_pads_to_max_tokens_and_caches(text_encoder):
    states, mask = text_encoder.encode(["flip it", "invert the colours please"], max_tokens=12)
    assert states.shape == (2, 12, 384) and mask.shape == (2, 12) and mask.dtype == torch.bool
    assert mask[0].sum() < mask[1].sum()
    assert torch.all(states[~mask] == 0)
    again, _ = text_encoder.encode(["invert the colours please"], max_tokens=12)
    torch.testing.assert_close(again[0], states[1])


def test_truncation_is_reported(text_encoder):
    long = "please make this photo look exactly like it was taken on a grey winter morning long ago"
    with pytest.warns(UserWarning, match="cut"):
        _, mask = text_encoder.encode([long], max_tokens=8)
    assert mask.sum() == 8 and long in text_encoder.truncated
    text_encoder.encode(["short"], max_tokens=8)
    assert "short" not in text_encoder.truncated


def test_image_features_are_tokens_and_differ(image_encoder):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=g)
    feats = image_encoder.encode(images)
    assert feats.shape == (2, 16, 1280)
    assert not torch.allclose(feats[0], feats[1])


def test_default_encoder_streams(text_encoder, image_encoder):
    enc = MiniLMEfficientNet(text_encoder, image_encoder, max_tokens=16)
    assert isinstance(enc, ConditionEncoder)
    raw = enc.raw(torch.rand(3, 3, 32, 32), ["flip it", "blur it", "add noise"])
    assert raw["text"].shape == (3, 16, 384) and raw["text_mask"].shape == (3, 16)
    assert raw["image"].shape == (3, 16, 1280)
    # the pooled stream is the sentence embedding: unit rows, equal to TextEncoder.embed
    assert raw["text_pooled"].shape == (3, 384)
    assert torch.allclose(raw["text_pooled"], text_encoder.embed(["flip it", "blur it", "add noise"]))
    assert torch.allclose(raw["text_pooled"].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(v.requires_grad for v in raw.values())
    assert ConditionProjector(enc.raw_dims, 64)(raw).shape == (3, 16 + 1 + 16, 64)


def test_base_hidden_encoder_streams(text_encoder):
    cfg = EditorConfig(image_size=16, width=32, depth=2, heads=2, max_text_tokens=8)
    enc = BaseHiddenEncoder(Editor(cfg), text_encoder)
    assert isinstance(enc, ConditionEncoder)
    raw = enc.raw(torch.rand(2, 3, 16, 16), ["flip it", "invert the colours"])
    assert raw["image"].shape == (2, 16, 32) and raw["text"].shape == (2, 8, 32)
    assert ConditionProjector(enc.raw_dims, 24)(raw).shape == (2, 24, 24)


def test_projector_layernorm_statistics_and_mask():
    proj = ConditionProjector({"text": 384, "image": 1280}, 64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :3] = True
    raw = {"text": torch.randn(2, 5, 384), "text_mask": mask, "image": 50 * torch.randn(2, 16, 1280) + 7}
    out = proj(raw)
    assert out.shape == (2, 21, 64)
    real = torch.cat([out[:, :3], out[:, 5:]], dim=1)  # LayerNorm at init: zero mean, unit variance per token
    torch.testing.assert_close(real.mean(-1), torch.zeros(2, 19), atol=1e-5, rtol=0)
    torch.testing.assert_close(real.var(-1, unbiased=False), torch.ones(2, 19), atol=1e-3, rtol=0)
    assert torch.all(out[:, 3:5] == 0)  # padding comes out as zeros
    assert proj.mask(raw).tolist() == [[True] * 3 + [False] * 2 + [True] * 16] * 2
    from funcmem.editing.methods import padding_mask

    assert torch.equal(padding_mask(out), proj.mask(raw))  # what the generator is told to skip


def test_projector_rejects_wrong_widths():
    proj = ConditionProjector({"image": 1280}, 8)
    with pytest.raises(ValueError, match="image"):
        proj({"image": torch.randn(1, 16, 100)})
    with pytest.raises(KeyError, match="image"):
        proj({"text": torch.randn(1, 4, 1280)})


def test_projector_standardises_with_training_statistics():
    """After set_statistics the projector sees each stream feature-wise centred and scaled
    (the common component of instruction embeddings removed), masked positions ignored."""
    import torch

    from funcmem.editing.conditions import ConditionProjector

    torch.manual_seed(0)
    text = 5 + 3 * torch.randn(64, 4, 8)
    mask = torch.ones(64, 4, dtype=torch.bool)
    mask[:, 3] = False
    text[:, 3] = 1000.0  # padding: must not enter the statistics
    proj = ConditionProjector({"text": 8}, 16)
    proj.set_statistics({"text": text, "text_mask": mask})
    assert torch.allclose(proj.text_mean, text[:, :3].reshape(-1, 8).mean(0))
    seen = []
    proj.streams["text"].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    proj({"text": text, "text_mask": mask})
    real = seen[0][:, :3].reshape(-1, 8)
    assert real.mean(0).abs().max() < 1e-4 and (real.std(0) - 1).abs().max() < 1e-2


def test_label_encoder_reads_the_edit_off_every_phrasing():
    """Every phrasing of every edit, with any strength word, gives that edit's one-hot id."""
    from funcmem.editing.conditions import EditLabelEncoder
    from funcmem.editing.ops import EDITS
    from funcmem.editing.tasks import sample_instance

    enc = EditLabelEncoder()
    assert isinstance(enc, ConditionEncoder) and enc.raw_dims == {"label": len(EDITS)}
    g = torch.Generator().manual_seed(0)
    texts, ids = [], []
    for k, name in enumerate(EDITS):
        for split in ("seen_wording", "held_out_wording", "held_out_values"):  # values, words, colours
            for _ in range(6 if EDITS[name].has_strength or split != "held_out_values" else 0):
                texts.append(sample_instance(split, g, edits=[name]).text)
                ids.append(k)
    raw = enc.raw(torch.zeros(len(texts), 3, 8, 8), texts)
    assert torch.equal(raw["label"], F.one_hot(torch.tensor(ids), len(EDITS)).float())
    assert enc.edit_id("Make it  LOOK like an old damaged photo strongly") == list(EDITS).index("age")
    with pytest.raises(ValueError, match="starts with none of them"):
        enc.raw(torch.zeros(1, 3, 8, 8), ["paint it purple"])


def test_label_condition_goes_through_the_projector_and_generator():
    from funcmem.editing.conditions import EditLabelEncoder
    from funcmem.editing.methods import EditingMemory
    from funcmem.generator import GeneratorConfig

    enc = EditLabelEncoder(["brighten", "darken"])
    editor = Editor(EditorConfig(width=32, depth=1, heads=2))
    memory = EditingMemory.create(editor, enc.raw_dims, ["img_attn.qkv"], rank=2, alpha=2, condition_dim=16,
                                  generator=GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2))
    raw = enc.raw(torch.zeros(4, 3, 32, 32), ["brighten the photo", "make it darker", "make it brighter", "dim the image"])
    memory.projector.set_statistics(raw)
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(std=0.1)
        lora = memory.lora({"raw": raw})
    a = lora.flatten()
    torch.testing.assert_close(a[0], a[2])  # the same edit, the same LoRA
    assert not torch.allclose(a[0], a[1])


def test_editing_memory_masks_padded_instruction_tokens():
    """The generator reads an instruction's real tokens only: the same instruction padded to more
    text slots (junk in the padding before the projector zeroes it) gives the same LoRA. (Padding
    counts in the rope positions of later streams: here the text stream comes last.)"""
    from funcmem.editing.methods import EditingMemory
    from funcmem.generator import GeneratorConfig

    editor = Editor(EditorConfig(width=32, depth=1, heads=2))
    memory = EditingMemory.create(editor, {"image": 6, "text": 8}, ["img_attn.qkv"], rank=2, alpha=2, condition_dim=16,
                                  generator=GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2))
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(std=0.1)
    text, image = torch.randn(1, 3, 8), torch.randn(1, 2, 6)
    short = {"text": text, "text_mask": torch.ones(1, 3, dtype=torch.bool), "image": image}
    long = {"text": torch.cat([text, torch.randn(1, 4, 8)], 1),
            "text_mask": torch.tensor([[True] * 3 + [False] * 4]), "image": image}
    with torch.no_grad():
        a, b = memory.lora({"raw": short}).flatten(), memory.lora({"raw": long}).flatten()
        memory.mask_padding = False
        c = memory.lora({"raw": long}).flatten()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert (a - c).abs().max() > 1e-4


def test_texts_encoded_in_length_chunks_match_one_at_a_time(text_encoder):
    """``encode`` / ``embed`` run new texts in chunks of similar length: the same states as encoding
    each text alone (padding is masked out), and every text lands in exactly one chunk."""
    from funcmem.editing.conditions import TEXT_CHUNK, _by_length

    texts = [f"make it {'much ' * (i % 7)}brighter, picture {i}" for i in range(TEXT_CHUNK + 9)]
    chunks = _by_length(texts)
    assert sorted(t for c in chunks for t in c) == sorted(texts) and max(map(len, chunks)) == TEXT_CHUNK
    assert all(len(a) <= len(b) for c, d in zip(chunks, chunks[1:]) for a, b in [(c[-1], d[0])])
    fresh = type(text_encoder)()  # an empty cache
    states, mask = fresh.encode(texts, 16)
    embeds = fresh.embed(texts)
    for i in (0, 5, len(texts) - 1):
        alone = type(text_encoder)()
        s, m = alone.encode([texts[i]], 16)
        assert torch.equal(m[0], mask[i])
        torch.testing.assert_close(s[0], states[i], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(alone.embed([texts[i]])[0], embeds[i], atol=2e-5, rtol=1e-4)


def test_value_encoder_tells_each_edit_and_its_value():
    """label-value: one token per clause (one-hot edit, strength over the default, tint's rgb), the second masked
    for a single edit; different values reach the generator as different LoRAs."""
    from funcmem.editing.conditions import CONDITIONS, EditValueEncoder, make_encoder
    from funcmem.editing.methods import EditingMemory
    from funcmem.editing.ops import COLOURS, EDITS
    from funcmem.generator import GeneratorConfig

    assert "label-value" in CONDITIONS and isinstance(make_encoder("label-value", None, None), EditValueEncoder)
    enc = EditValueEncoder()
    names = list(EDITS)
    texts = ["make it warmer by 40% and darken the photo slightly", "make it warmer by 80%",
             EDITS["tint"].train_phrasings[0].format(colour="orange"), "make it clean and noise free"]
    raw = enc.raw(torch.zeros(4, 3, 8, 8), texts)
    told, mask = raw["told"], raw["told_mask"]
    assert told.shape == (4, 2, len(EDITS) + 4) and mask.tolist() == [[True, True], [True, False], [True, False], [True, False]]
    assert told[0, 0, names.index("warmer")] == 1 and told[0, 1, names.index("darken")] == 1
    torch.testing.assert_close(told[0, :, -4], torch.tensor([40 / 50, 0.5]))
    torch.testing.assert_close(told[1, 0, -4], torch.tensor(80 / 50))
    torch.testing.assert_close(told[2, 0, -3:], torch.tensor(COLOURS["orange"]) / 255)
    assert told[3, 0, names.index("denoise")] == 1 and (told[3, 0, -4:] == 0).all() and (told[:, 1][~mask[:, 1]] == 0).all()
    with pytest.raises(ValueError, match="not an instruction of the edit family"):
        enc.raw(torch.zeros(1, 3, 8, 8), ["paint it purple"])

    editor = Editor(EditorConfig(width=32, depth=1, heads=2))
    memory = EditingMemory.create(editor, enc.raw_dims, ["img_attn.qkv"], rank=2, alpha=2, condition_dim=16,
                                  generator=GeneratorConfig(d_model=32, depth=1, head_dim=8, token_dim=16, dim_accumulation=2))
    memory.projector.set_statistics(raw)
    with torch.no_grad():
        memory.fm.generator.model.proj_out_B.weight.normal_(std=0.1)
        a = memory.lora({"raw": enc.raw(torch.zeros(3, 3, 8, 8), texts[1:2] * 2 + ["make it warmer by 20%"])}).flatten()
    torch.testing.assert_close(a[0], a[1])
    assert not torch.allclose(a[0], a[2])  # the same edit, another value: another LoRA
