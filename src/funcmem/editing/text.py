"""Instruction text at the application's boundary.

    clean_instruction(text) -> text without control characters, or a clear error
"""

from __future__ import annotations

import unicodedata

MAX_INSTRUCTION_CHARS = 1000


def clean_instruction(text, max_chars: int = MAX_INSTRUCTION_CHARS) -> str:
    """An instruction fit for the tokenizer: NFC-normalised, control characters removed,
    whitespace runs (newlines, tabs) collapsed to one space.

    Any language is kept as it is (the tokenizer maps what it does not know to [UNK]; the text
    encoder warns when it has to cut a long instruction).

    Raises:
        TypeError: not a string.
        ValueError: empty or only whitespace / control characters, or longer than ``max_chars``
            characters after cleaning.
    """
    if not isinstance(text, str):
        raise TypeError(f"the instruction must be a string, got {type(text).__name__}")
    text = unicodedata.normalize("NFC", text)
    kept = []
    for ch in text:
        category = unicodedata.category(ch)
        if ch.isspace():
            kept.append(" ")
        elif category in ("Cc", "Cs") or ch in "\ufeff\u200b":  # controls, lone surrogates, BOM, zero-width space
            continue
        else:
            kept.append(ch)
    cleaned = " ".join("".join(kept).split())
    if not cleaned:
        raise ValueError("the instruction is empty" + (" (it held only whitespace or control characters)" if text else ""))
    if len(cleaned) > max_chars:
        raise ValueError(f"the instruction is {len(cleaned)} characters long; the limit is {max_chars}")
    return cleaned
