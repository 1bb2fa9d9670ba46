"""Edit operators: each target is an exact function of the input and the value the instruction
names, values order the effect, pairs undo each other."""

import pytest
import torch

from funcmem.editing.ops import (
    AGE_RESTORE_RANGE, COLOURS, EDITS, FAMILY, INVERSE_PAIRS, LEGACY, PERCENT, RESTORE_RANGE, STRENGTH_WORDS, TEMPERATURE_GAIN,
    TINT_AMOUNT, UNSHARP_SIGMA, age, fixed_pattern, gaussian_blur, luminance, sigmoid_contrast, unsharp_mask,
)

FORWARD = [name for name, e in EDITS.items() if e.has_strength]
SCALAR = [name for name in FORWARD if EDITS[name].values.unit != "colour"]
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


def test_the_family_is_six_adjacent_inverse_pairs_plus_tint():
    assert list(FAMILY) == list(EDITS)[: len(FAMILY)] and FAMILY[-1] == "tint" and EDITS["tint"].inverse is None
    assert set(EDITS) == set(FAMILY) | set(LEGACY)
    pairs = [p for p in INVERSE_PAIRS if p[0] in FAMILY]
    assert len(pairs) == 6
    for a, b in INVERSE_PAIRS:
        assert EDITS[a].inverse == b and EDITS[b].inverse == a
        assert list(EDITS).index(b) == list(EDITS).index(a) + 1
    assert {n for pair in pairs for n in pair} == set(FAMILY) - {"tint"}
    assert RESTORING == ["denoise", "restore"]


def test_phrasings_carry_no_value():
    for e in EDITS.values():
        for p in e.train_phrasings + e.test_phrasings:
            assert not any(ch.isdigit() for ch in p) and "%" not in p, p
            assert not any(f" {w}" in f" {p}" for w in STRENGTH_WORDS), p
            assert ("{colour}" in p) == (e.name == "tint"), p
        assert "{" not in e.example()


def test_values_write_and_default():
    assert PERCENT.write(40) == " by 40%" and EDITS["blur"].values.write(2.5) == " by 2.5 px"
    assert EDITS["tint"].values.write("teal" if "teal" in COLOURS else "red") in COLOURS
    assert EDITS["tint"].values.write((0, 128, 255)) == "rgb(0, 128, 255)"
    x = images(2)
    for name in SCALAR:
        _, by_default = EDITS[name].apply(x)
        _, explicit = EDITS[name].apply(x, EDITS[name].values.default)
        assert torch.equal(by_default, explicit), name


# ---------------------------------------------------------------- exact targets


def test_targets_are_the_documented_formulas():
    x = images(3)
    v = torch.tensor([20.0, 50.0, 100.0])
    cases = {
        "brighten": x ** (1 / (1 + v / 100)).view(-1, 1, 1, 1),
        "darken": x ** (1 + v / 100).view(-1, 1, 1, 1),
        "contrast_up": torch.sigmoid((1 + v / 100).view(-1, 1, 1, 1) * torch.logit(x.clamp(1e-3, 1 - 1e-3))),
        "contrast_down": torch.sigmoid((1 / (1 + v / 100)).view(-1, 1, 1, 1) * torch.logit(x.clamp(1e-3, 1 - 1e-3))),
        "sharpen": (x + (v / 100).view(-1, 1, 1, 1) * (x - gaussian_blur(x, UNSHARP_SIGMA))).clamp(0, 1),
        "age": age(x, v / 50),
    }
    k = (1 + TEMPERATURE_GAIN * v / 100).view(-1, 1, 1)
    cases["warmer"] = torch.stack((x[:, 0] * k, x[:, 1], x[:, 2] / k), 1).clamp(0, 1)
    cases["cooler"] = torch.stack((x[:, 0] / k, x[:, 1], x[:, 2] * k), 1).clamp(0, 1)
    for name, expected in cases.items():
        inp, target = EDITS[name].apply(x, v)
        assert torch.equal(inp, x)
        assert torch.allclose(target, expected, atol=1e-5), name
    sig = torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(EDITS["blur"].apply(x, sig)[1], gaussian_blur(x, sig), atol=1e-6)


def test_add_noise_adds_the_same_fixed_grain_scaled_by_its_value():
    grey = torch.full((2, 3, 24, 40), 0.5)
    pattern = fixed_pattern("noise", 24, 40)
    assert pattern.shape == (1, 24, 40) and torch.equal(pattern[:, :8, :8], pattern[:, 8:16, 16:24])  # period 8
    for v in (4, 8, 12):
        inp, target = EDITS["add_noise"].apply(grey, v)
        assert torch.equal(inp, grey)
        assert torch.allclose(target - inp, v / 100 * pattern.expand_as(grey), atol=1e-6)


def test_denoise_input_is_the_same_grain_at_an_unknown_strength():
    grey = torch.full((16, 3, 16, 16), 0.5)
    inp, target = EDITS["denoise"].apply(grey, None, rng())
    assert torch.equal(target, grey)
    amount = ((inp - grey) / fixed_pattern("noise", 16, 16)).flatten(1).median(1).values  # per sample
    default = EDITS["add_noise"].values.default / 100
    lo, hi = RESTORE_RANGE
    assert (amount > lo * default - 1e-4).all() and (amount < hi * default + 1e-4).all() and amount.std() > 0.005


def test_restore_input_is_age_at_a_strength_inside_its_range():
    """restore's input is age(clean, s) for one s per sample in AGE_RESTORE_RANGE (units of age's default)."""
    x = images(8)
    inp, _ = EDITS["restore"].apply(x, None, rng())
    grid = torch.linspace(0.4, 1.7, 1301)  # s, step 0.001
    err = torch.stack([(age(x, float(s)) - inp).abs().flatten(1).amax(1) for s in grid])  # (S, B)
    best = grid[err.argmin(0)]
    assert err.min(0).values.max() < 1e-3  # the grid's step
    lo, hi = AGE_RESTORE_RANGE
    assert (best > lo - 2e-3).all() and (best < hi + 2e-3).all() and best.std() > 0.05


@pytest.mark.parametrize("name", RESTORING)
def test_restoration_target_is_the_clean_image_and_input_damage_varies(name):
    x = images(8)
    inp, target = EDITS[name].apply(x, None, rng())
    assert torch.equal(target, x)
    change = (inp - x).abs().flatten(1).mean(1)  # (B,) per-sample damage
    assert (change > 1e-3).all() and change.std() > 0.05 * change.mean()
    assert torch.equal(inp, EDITS[name].apply(x, None, rng())[0])  # deterministic for a seed
    with pytest.raises(ValueError, match="rng"):
        EDITS[name].apply(x, None, None)


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
    assert torch.equal(EDITS["age"].apply(x, 50)[1], EDITS["age"].apply(x, 50)[1])


def test_unbatched_and_per_sample_values_agree_with_batched():
    x = images(3)
    for name in SCALAR:
        v = torch.tensor(EDITS[name].values.train[:3], dtype=torch.float32)
        _, batched = EDITS[name].apply(x, v)
        for i in range(3):
            _, single = EDITS[name].apply(x[i], float(v[i]))
            assert single.shape == (3, 32, 32)
            assert torch.allclose(single, batched[i], atol=1e-5), name
    _, tinted = EDITS["tint"].apply(x, ["red", (0, 0, 255), "green"])
    assert torch.allclose(tinted[1], EDITS["tint"].apply(x[1], (0, 0, 255))[1], atol=1e-6)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(3, 32\)"):
        EDITS["blur"].apply(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="unknown colour 'teal-ish'"):
        EDITS["tint"].apply(images(1), "teal-ish")
    with pytest.raises(ValueError, match="0..255"):
        EDITS["tint"].apply(images(1), (0, 300, 0))


# ---------------------------------------------------------------- what each edit does


@pytest.mark.parametrize("name", SCALAR)
def test_values_order_the_effect(name):
    x = images()
    spec = EDITS[name].values
    values = sorted(spec.train + spec.held_out())
    effect = [float((EDITS[name].apply(x, v)[1] - x).abs().mean()) for v in values]
    assert all(a < b for a, b in zip(effect, effect[1:])), (name, effect)
    word = [float((EDITS[name].apply(x, spec.default * STRENGTH_WORDS[w])[1] - x).abs().mean())
            for w in ("slightly", "strongly")]
    assert word[0] < effect[values.index(min(v for v in values if v >= spec.default))] < word[1]


def test_brighten_and_darken_move_mean_luminance():
    x = images()
    lum = lambda y: luminance(y).flatten(1).mean(1)  # noqa: E731
    assert (lum(EDITS["brighten"].apply(x)[1]) > lum(x)).all() and (lum(EDITS["darken"].apply(x)[1]) < lum(x)).all()


def test_legacy_blur_removes_and_sharpen_adds_high_frequencies():
    x = images()
    assert (laplacian_variance(EDITS["blur"].apply(x)[1]) < 0.5 * laplacian_variance(x)).all()
    assert (laplacian_variance(EDITS["sharpen"].apply(x)[1]) > 1.5 * laplacian_variance(x)).all()
    assert torch.allclose(unsharp_mask(x, 0.0), x)


def test_warmer_and_cooler_shift_red_against_blue():
    x = images()
    rb = lambda y: (y[:, 0] - y[:, 2]).flatten(1).mean(1)  # noqa: E731
    assert (rb(EDITS["warmer"].apply(x)[1]) > rb(x)).all() and (rb(EDITS["cooler"].apply(x)[1]) < rb(x)).all()


def test_saturation_moves_chroma_and_keeps_luminance():
    x = 0.3 + 0.4 * images()
    chroma = lambda y: (y - luminance(y)).abs().flatten(1).mean(1)  # noqa: E731
    up, down = EDITS["saturate"].apply(x, 50)[1], EDITS["desaturate"].apply(x, 50)[1]
    assert (chroma(up) > chroma(x)).all() and (chroma(down) < chroma(x)).all()
    assert torch.allclose(luminance(down), luminance(x), atol=1e-5)


def test_contrast_moves_the_spread_around_mid_grey():
    x = images()
    spread = lambda y: (y - 0.5).abs().flatten(1).mean(1)  # noqa: E731
    assert (spread(EDITS["contrast_up"].apply(x)[1]) > spread(x)).all()
    assert (spread(EDITS["contrast_down"].apply(x)[1]) < spread(x)).all()
    assert torch.allclose(sigmoid_contrast(torch.full((1, 3, 2, 2), 0.5), 3.0), torch.full((1, 3, 2, 2), 0.5))


def test_tint_mixes_in_the_named_colour():
    x = images(2)
    _, y = EDITS["tint"].apply(x, "blue")
    rgb = torch.tensor(COLOURS["blue"]) / 255
    assert torch.allclose(y, (1 - TINT_AMOUNT) * x + TINT_AMOUNT * rgb.view(1, 3, 1, 1), atol=1e-6)


@pytest.mark.parametrize("a, b", [("brighten", "darken"), ("darken", "brighten"), ("warmer", "cooler"),
                                  ("cooler", "warmer"), ("contrast_up", "contrast_down"), ("contrast_down", "contrast_up"),
                                  ("saturate", "desaturate"), ("desaturate", "saturate")])
def test_inverse_pairs_undo_each_other(a, b):
    x = 0.3 + 0.4 * images()  # no clipping: these pairs are exact inverses there
    for v in (20, 50, 100):
        _, once = EDITS[a].apply(x, v)
        _, back = EDITS[b].apply(once, v)
        assert torch.allclose(back, x, atol=1e-4), (a, b, v)


@pytest.mark.parametrize("forward, restoring", [("add_noise", "denoise"), ("age", "restore")])
def test_restoring_inputs_look_like_forward_targets(forward, restoring):
    """A restoration edit's input is its forward edit's kind of damage at about its default strength."""
    x = images(16)
    _, damaged = EDITS[forward].apply(x)
    inp, _ = EDITS[restoring].apply(x, None, rng())
    d_forward, d_restore = (damaged - x).abs().mean(), (inp - x).abs().mean()
    assert 0.5 * d_forward < d_restore < 1.6 * d_forward
