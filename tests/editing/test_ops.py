"""Edit operators: each target is exact and learnable, strengths order the effect, pairs conflict."""

import pytest
import torch

from funcmem.editing.ops import (
    EDITS, INVERSE_PAIRS, NOISE_SCALE, RESTORE_RANGE, STRENGTH_WORDS, age, fixed_pattern, gaussian_blur,
    luminance, parse_strength, sample_instruction,
)

FORWARD = [name for name, e in EDITS.items() if e.has_strength]
RESTORING = [name for name, e in EDITS.items() if not e.has_strength]


def images(b=4, size=32, seed=0):
    """Smooth-ish random images: (b, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (x + 0.1 * torch.rand(b, 3, size, size, generator=g)).clamp(0, 1)


def laplacian_variance(x):
    """High-frequency energy per image: variance of the 4-neighbour Laplacian, (B,)."""
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.flatten(1).var(dim=1)


def rng(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the family


def test_edits_come_in_adjacent_inverse_pairs():
    names = list(EDITS)
    assert len(names) >= 12 and len(INVERSE_PAIRS) >= 6
    for a, b in INVERSE_PAIRS:
        assert EDITS[a].inverse == b and EDITS[b].inverse == a
        assert names.index(b) == names.index(a) + 1
    assert {n for pair in INVERSE_PAIRS for n in pair} == set(names)


def test_phrasings_are_many_distinct_and_carry_no_strength():
    seen = set()
    for e in EDITS.values():
        assert len(e.train_phrasings) >= 6 and len(e.test_phrasings) >= 2, e.name
        phrasings = e.train_phrasings + e.test_phrasings
        assert len(set(phrasings)) == len(phrasings), e.name
        assert not seen & set(phrasings), f"{e.name} shares phrasings with another edit"
        seen |= set(phrasings)
        for p in phrasings:
            assert parse_strength(p) == 1.0, p  # no strength word or number hides in a phrasing


# ---------------------------------------------------------------- instructions


@pytest.mark.parametrize("text, strength", [
    ("make it brighter", 1.0), ("make it brighter slightly", 0.5), ("Slightly brighten the photo", 0.5),
    ("darken the photo strongly", 1.6), ("add a lot of blur", 1.6), ("brighten by 0.8", 0.8),
    ("brighten by .5 strongly", 0.5), ("blur by 7", 2.0), ("blur by 0", 0.1),
])
def test_parse_strength(text, strength):
    assert parse_strength(text) == pytest.approx(strength)


def test_sample_instruction_uses_the_split_and_matches_its_strength():
    g = rng()
    for e in EDITS.values():
        for split, phrasings in (("train", e.train_phrasings), ("test", e.test_phrasings)):
            for _ in range(20):
                text, s = sample_instruction(e, split, g, numbers=True)
                assert any(text.startswith(p) for p in phrasings), text
                assert s == parse_strength(text)
                if not e.has_strength:
                    assert text in phrasings and s == 1.0
    words = {sample_instruction(EDITS["blur"], "train", g)[1] for _ in range(60)}
    assert words == {0.5, 1.0, 1.6}
    with pytest.raises(ValueError, match="split"):
        sample_instruction(EDITS["blur"], "val", g)


# ---------------------------------------------------------------- exact targets


@pytest.mark.parametrize("name", RESTORING)
def test_restoration_target_is_the_clean_image_and_input_degradation_varies(name):
    x = images(8)
    inp, target = EDITS[name].apply(x, 1.0, rng())
    assert torch.equal(target, x)
    change = (inp - x).abs().flatten(1).mean(1)  # (B,) per-sample degradation
    assert (change > 1e-3).all()
    assert change.std() > 0.05 * change.mean()  # a random strength per sample
    inp2, _ = EDITS[name].apply(x, 1.0, rng())
    assert torch.equal(inp, inp2)  # deterministic for a seed
    with pytest.raises(ValueError, match="rng"):
        EDITS[name].apply(x, 1.0, None)


def test_add_noise_adds_the_same_fixed_pattern_scaled_by_strength():
    grey = torch.full((2, 3, 24, 40), 0.5)
    pattern = fixed_pattern("noise", 24, 40)
    for s in (0.5, 1.0, 1.6):
        inp, target = EDITS["add_noise"].apply(grey, s, rng(s.__hash__()))  # rng is irrelevant
        assert torch.equal(inp, grey)
        assert torch.allclose(target - inp, NOISE_SCALE * s * pattern.expand_as(grey), atol=1e-6)
    assert torch.equal(fixed_pattern("noise", 24, 40), pattern)
    assert pattern.std() > 0.5 and abs(float(pattern.mean())) < 0.2


def test_fixed_patterns_tile_from_the_top_left():
    big = fixed_pattern("grain", 40, 40)
    assert torch.equal(big[:, :16, :16], big[:, 16:32, 16:32])
    assert torch.equal(fixed_pattern("grain", 10, 12), big[:, :10, :12])
    scratches = fixed_pattern("scratches", 32, 32)
    assert scratches.min() >= 0 and scratches.max() <= 1 and scratches.sum() > 0
    with pytest.raises(ValueError, match="unknown pattern"):
        fixed_pattern("dust", 8, 8)


def test_age_is_deterministic_and_identity_at_zero():
    x = images()
    assert torch.allclose(age(x, 0.0), x, atol=1e-6)
    _, t1 = EDITS["age"].apply(x, 1.0, rng(1))
    _, t2 = EDITS["age"].apply(x, 1.0, rng(2))
    assert torch.equal(t1, t2)


def test_unbatched_and_per_sample_strengths_agree_with_batched():
    x = images(3)
    s = torch.tensor([0.5, 1.0, 1.6])
    for name in FORWARD:
        _, batched = EDITS[name].apply(x, s)
        for i in range(3):
            _, single = EDITS[name].apply(x[i], float(s[i]))
            assert single.shape == (3, 32, 32)
            assert torch.allclose(single, batched[i], atol=1e-5), name


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        EDITS["blur"].apply(torch.zeros(3, 32))


# ---------------------------------------------------------------- what each edit does


def test_brighten_and_darken_move_mean_luminance():
    x = images()
    _, bright = EDITS["brighten"].apply(x, 1.0)
    _, dark = EDITS["darken"].apply(x, 1.0)
    lum = lambda y: luminance(y).flatten(1).mean(1)  # noqa: E731
    assert (lum(bright) > lum(x)).all() and (lum(dark) < lum(x)).all()


def test_blur_removes_and_sharpen_restores_high_frequencies():
    x = images()
    _, blurred = EDITS["blur"].apply(x, 1.0)
    assert (laplacian_variance(blurred) < 0.5 * laplacian_variance(x)).all()
    inp, target = EDITS["sharpen"].apply(x, 1.0, rng())
    assert (laplacian_variance(target) > laplacian_variance(inp)).all()


def test_gaussian_blur_basics():
    x = images(3)
    assert torch.allclose(gaussian_blur(x, 0.0), x)
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    sig = torch.tensor([0.5, 1.0, 3.0])
    per_sample = gaussian_blur(x, sig)
    for i in range(3):
        assert torch.allclose(per_sample[i], gaussian_blur(x[i], float(sig[i])), atol=1e-5)


def test_warmer_and_cooler_shift_red_against_blue():
    x = images()
    _, warm = EDITS["warmer"].apply(x, 1.0)
    _, cool = EDITS["cooler"].apply(x, 1.0)
    rb = lambda y: (y[:, 0] - y[:, 2]).flatten(1).mean(1)  # noqa: E731
    assert (rb(warm) > rb(x)).all() and (rb(cool) < rb(x)).all()


def test_contrast_moves_spread_and_keeps_mean():
    x = 0.3 + 0.4 * images()  # inside [0.3, 0.7]: no clipping at strength 1
    _, up = EDITS["contrast_up"].apply(x, 1.0)
    _, down = EDITS["contrast_down"].apply(x, 1.0)
    spread = lambda y: luminance(y).flatten(1).std(1)  # noqa: E731
    assert (spread(up) > spread(x)).all() and (spread(down) < spread(x)).all()
    mean = lambda y: luminance(y).flatten(1).mean(1)  # noqa: E731
    assert torch.allclose(mean(up), mean(x), atol=1e-5) and torch.allclose(mean(down), mean(x), atol=1e-5)


@pytest.mark.parametrize("name", FORWARD)
def test_strength_words_order_the_effect(name):
    x = images()
    effect = []
    for word in ("slightly", "", "strongly"):
        s = parse_strength(f"{EDITS[name].train_phrasings[0]} {word}")
        inp, target = EDITS[name].apply(x, s)
        effect.append(float((target - inp).abs().mean()))
    assert effect[0] < effect[1] < effect[2], effect
    assert STRENGTH_WORDS["slightly"] < 1.0 < STRENGTH_WORDS["strongly"]


@pytest.mark.parametrize("a, b", [("brighten", "darken"), ("darken", "brighten"), ("warmer", "cooler"),
                                  ("cooler", "warmer"), ("contrast_down", "contrast_up")])
def test_inverse_pairs_undo_each_other(a, b):
    x = 0.3 + 0.4 * images()  # no clipping: these pairs are exact inverses there
    for s in (0.5, 1.0, 1.6):
        _, once = EDITS[a].apply(x, s)
        _, back = EDITS[b].apply(once, s)
        assert torch.allclose(back, x, atol=1e-5), (a, b, s)


@pytest.mark.parametrize("forward, restoring", [("blur", "sharpen"), ("add_noise", "denoise"), ("age", "restore")])
def test_restoring_inputs_look_like_forward_targets(forward, restoring):
    """A restoration edit's input is its forward edit's kind of damage (same operator family)."""
    x = images(16)
    _, damaged = EDITS[forward].apply(x, 1.0)
    inp, _ = EDITS[restoring].apply(x, 1.0, rng())
    d_forward = (damaged - x).abs().mean()
    d_restore = (inp - x).abs().mean()
    lo, hi = RESTORE_RANGE
    assert 0.3 * d_forward < d_restore < 2.0 * d_forward
    assert lo < 1.0 < hi
