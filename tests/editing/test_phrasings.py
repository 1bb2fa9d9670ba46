"""The language rules: enough phrasings, held-out wording free of other edits' keywords, and a
base editor that never hears the benchmark's words."""

import pytest
import torch

from funcmem.editing import phrasings, pretrain
from funcmem.editing.ops import COLOURS, EDITS
from funcmem.editing.tasks import language_extra


def test_the_phrasings_follow_the_rules():
    phrasings.check_language(language_extra())  # raises, listing every problem
    assert set(phrasings.TRAIN) == set(phrasings.HELD_OUT) == set(EDITS)
    for edit in EDITS:
        assert len(phrasings.TRAIN[edit]) >= 30 and len(phrasings.HELD_OUT[edit]) >= 6


def test_the_check_catches_a_borrowed_keyword(monkeypatch):
    """The issue's example: "make the darks darker and the lights lighter" borrows darken's and brighten's words."""
    held = dict(phrasings.HELD_OUT)
    held["contrast_up"] = held["contrast_up"] + ("make the darks darker and the lights lighter",)
    monkeypatch.setattr(phrasings, "HELD_OUT", held)
    with pytest.raises(ValueError, match=r"contrast_up held-out 'make the darks darker.*\['dark', 'light'\].*brighten.*darken"):
        phrasings.check_language(language_extra())


def test_the_check_catches_too_few_and_duplicated_phrasings(monkeypatch):
    train = dict(phrasings.TRAIN)
    train["blur"] = train["blur"][:5] + (train["sharpen"][0],)
    monkeypatch.setattr(phrasings, "TRAIN", train)
    with pytest.raises(ValueError) as err:
        phrasings.check_language(language_extra())
    assert "blur: 6 training phrasings, need 30" in str(err.value)
    assert "is a phrasing of both" in str(err.value)


@pytest.mark.parametrize("a, b, related", [
    ("blurry", "blur", True), ("brighter", "brightness", True), ("darken", "dark", True), ("lighten", "light", True),
    ("background", "back", False), ("text", "texture", True), ("old", "older", True), ("tin", "tint", False),
])
def test_keyword_matching(a, b, related):
    assert bool(phrasings.clashes(a, phrasings.content_words(b))) == related


def test_generic_words_are_nobody_s_keyword():
    assert phrasings.content_words("make the image a bit more colorful by 40%") == {"colorful"}
    assert phrasings.content_words("give it a {colour} tint") == {"tint"}


def test_the_base_editor_never_hears_a_benchmark_keyword():
    words = phrasings.all_keywords(language_extra())
    assert {"blur", "bright", "warm", "tint"} <= words and set(COLOURS) <= words
    g = torch.Generator().manual_seed(0)
    texts = set(pretrain.instructions()) | {pretrain.unknown_instruction(g) for _ in range(3000)}
    bad = {t: phrasings.clashes(t, words) for t in texts if phrasings.clashes(t, words)}
    assert not bad, list(bad.items())[:5]
