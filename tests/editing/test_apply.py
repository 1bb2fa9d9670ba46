"""``funcmem edit``'s entry point: the instruction is cleaned, any image size comes back at its size."""

from types import SimpleNamespace as NS

import pytest
import torch

from funcmem.editing.apply import edit_image


def test_edit_image_cleans_the_instruction_and_takes_any_image_size():
    seen = []

    class Text:
        def encode(self, texts, max_tokens):
            seen.extend(texts)
            return torch.zeros(len(texts), max_tokens, 384), torch.ones(len(texts), max_tokens, dtype=torch.bool)

    class Encoder:
        def raw(self, tiles, instructions):
            return {}

    class Brighter:
        def predict(self, batch):
            return batch["inputs"] + 0.1

    loaded = NS(size=8, text_encoder=Text(), editor=NS(config=NS(max_text_tokens=4)), encoder=Encoder(),
                methods={"functional_memory": Brighter()})
    for shape in [(3, 1, 1), (3, 1, 100), (3, 37, 5)]:
        out = edit_image(loaded, torch.full(shape, 0.5), " make\x00 it\nbrighter\x1b ")
        assert out.shape == shape
        torch.testing.assert_close(out, torch.full(shape, 0.6))
    assert set(seen) == {"make it brighter"}
    for bad in ("", "\n\t \x00", "x" * 5000):
        with pytest.raises(ValueError, match="empty|characters long"):
            edit_image(loaded, torch.zeros(3, 4, 4), bad)
