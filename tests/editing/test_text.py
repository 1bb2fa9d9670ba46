"""Instructions are cleaned at the application's boundary: control characters out, any language
kept, empty / too long / not a string refused with a clear message."""

import pytest

from funcmem.editing.text import clean_instruction


@pytest.mark.parametrize("text, cleaned", [
    ("make it brighter", "make it brighter"),
    ("  make\tit\n\nbrighter \r\n", "make it brighter"),
    ("make\x00 it\x1b[31m brighter\x7f", "make it[31m brighter"),
    ("\ufeffblur\u200b it", "blur it"),
    ("rends l'image plus claire", "rends l'image plus claire"),
    ("画像を明るくして", "画像を明るくして"),
    ("e\u0301claircir", "\u00e9claircir"),  # NFC
])
def test_instructions_are_cleaned(text, cleaned):
    assert clean_instruction(text) == cleaned


@pytest.mark.parametrize("text, error, message", [
    ("", ValueError, "empty"),
    ("   \n\t ", ValueError, "empty .*whitespace or control"),
    ("\x00\x01\x02", ValueError, "empty"),
    ("x" * 1001, ValueError, "1001 characters long; the limit is 1000"),
    (None, TypeError, "string, got NoneType"),
    (b"blur", TypeError, "string, got bytes"),
])
def test_bad_instructions_are_refused(text, error, message):
    with pytest.raises(error, match=message):
        clean_instruction(text)
