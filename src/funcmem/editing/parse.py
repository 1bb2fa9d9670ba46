"""Reading an instruction of the editing family back into its edits and values.

The inverse of how ``tasks`` writes instructions: one or two clauses joined by " and ", each a
phrasing of one edit (``funcmem.editing.phrasings``) followed by nothing (the edit's default), a
strength word ("slightly", "strongly") or a number ("by 40%"); tint's phrasings name a colour in
their ``{colour}`` slot, by name (``ops.COLOURS``) or as "rgb(r, g, b)".

    parse_instruction("make it warmer by 40% and darken the photo slightly")
        -> (("warmer", "darken"), (40.0, 25.0))

It knows only the family's own phrasings: it is what an oracle told the answer reads (the
``label-value`` condition), not a language model.
"""

from __future__ import annotations

import re
from functools import lru_cache

from .ops import COLOURS, EDITS, STRENGTH_WORDS, Edit

WORDS = ("slightly", "strongly")  # the strength words instructions write (``tasks``)
_NUMBER = r"(\d+(?:\.\d+)?)"
_COLOUR = r"(" + "|".join(sorted(map(re.escape, COLOURS), key=len, reverse=True)) + r"|rgb\(\d+, \d+, \d+\))"


@lru_cache(maxsize=None)
def _clause_patterns() -> tuple[tuple[re.Pattern, Edit], ...]:
    """(pattern, edit) for every phrasing of every edit, longest phrasing first. A pattern matches
    one clause at the start of a text: the phrasing and its value (group 1, if any)."""
    rows = []
    for edit in EDITS.values():
        for phrasing in (*edit.train_phrasings, *edit.test_phrasings):
            if edit.values is not None and edit.values.unit == "colour":
                before, after = (re.escape(part) for part in phrasing.split("{colour}", 1))
                pattern = before + _COLOUR + after
            elif edit.values is not None:  # then a number in the edit's suffix, a strength word, or nothing
                number = re.escape(edit.values.suffix).replace(re.escape("{v}"), _NUMBER)
                pattern = re.escape(phrasing) + "(?:" + number + "| (" + "|".join(WORDS) + "))?"
            else:  # a restoration edit names no value
                pattern = re.escape(phrasing)
            rows.append((len(phrasing), pattern, edit))
    rows.sort(key=lambda row: -row[0])
    return tuple((re.compile(pattern + r"(?= and |$)"), edit) for _, pattern, edit in rows)


def _value(edit: Edit, match: re.Match):
    """The value a clause names, as ``tasks.Instance.values`` holds it."""
    spec = edit.values
    if spec is None:
        return None
    if spec.unit == "colour":
        text = match.group(1)
        return text if text in COLOURS else tuple(int(c) for c in re.findall(r"\d+", text))
    number, word = match.group(1), match.group(2)
    if number is not None:
        return float(number)
    return spec.default * STRENGTH_WORDS[word] if word is not None else spec.default


def _clauses(text: str, pos: int, left: int) -> list[tuple[str, object]] | None:
    """Clauses from ``pos`` to the end (at most ``left`` of them), or None if the text does not parse."""
    for pattern, edit in _clause_patterns():
        match = pattern.match(text, pos)
        if match is None:
            continue
        clause = (edit.name, _value(edit, match))
        if match.end() == len(text):
            return [clause]
        rest = _clauses(text, match.end() + len(" and "), left - 1) if left > 1 else None
        if rest is not None:
            return [clause, *rest]
    return None


def parse_instruction(text: str, max_edits: int = 2) -> tuple[tuple[str, ...], tuple]:
    """The edits an instruction names, in order, and the value of each.

    Args:
        text: an instruction as ``tasks`` writes it (case and runs of spaces are ignored).
        max_edits: the most clauses it may join.
    Returns:
        (edit names, values): a value is a float in the edit's unit (the default when none is
        named, the default times the factor of a strength word), a colour name or (r, g, b)
        triple for tint, or None for a restoration edit.
    Raises:
        ValueError: the text is not one to ``max_edits`` of the family's phrasings joined by "and".
    """
    clauses = _clauses(" ".join(text.lower().split()), 0, max_edits)
    if clauses is None:
        raise ValueError(f"not an instruction of the edit family (its phrasings, a value, 'and'): {text!r}")
    return tuple(c[0] for c in clauses), tuple(c[1] for c in clauses)
