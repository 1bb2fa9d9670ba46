"""Reading instructions back into edits and values (the label-value condition's parser)."""

import pytest
import torch

from funcmem.editing.ops import EDITS
from funcmem.editing.parse import parse_instruction
from funcmem.editing.tasks import SPLITS, sample_instance


@pytest.mark.parametrize("split", list(SPLITS))
def test_every_instruction_a_split_writes_parses_back_to_its_instance(split):
    g = torch.Generator().manual_seed(3)
    for _ in range(400):
        inst = sample_instance(split, g)
        assert parse_instruction(inst.text) == (inst.edits, inst.values), inst


def test_values_defaults_words_numbers_and_colours():
    default = EDITS["warmer"].values.default
    assert parse_instruction("make it warmer") == (("warmer",), (default,))
    assert parse_instruction("Make it  WARMER slightly") == (("warmer",), (default * 0.5,))
    assert parse_instruction("make it warmer by 37%") == (("warmer",), (37.0,))
    tint = next(p for p in EDITS["tint"].train_phrasings if p.startswith("tint"))
    assert parse_instruction(tint.format(colour="orange")) == (("tint",), ("orange",))
    assert parse_instruction(tint.format(colour="rgb(1, 2, 3)")) == (("tint",), ((1, 2, 3),))
    # a restoration phrasing that itself contains "and" is one clause, not two
    assert parse_instruction("make it clean and noise free") == (("denoise",), (None,))
    assert parse_instruction("make it warmer by 40% and darken the photo slightly")[0] == ("warmer", "darken")


@pytest.mark.parametrize("text", ["paint it purple", "make it warmer by lots", "make it warmer and", "",
                                  "make it warmer and make it cooler and make it warmer"])
def test_text_outside_the_family_is_refused_with_a_clear_error(text):
    with pytest.raises(ValueError, match="not an instruction of the edit family"):
        parse_instruction(text)
