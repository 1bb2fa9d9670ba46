"""Fixtures of the editing tests."""

import pytest

from funcmem.editing.conditions import TextEncoder


@pytest.fixture(scope="session")
def text_encoder():
    """The frozen MiniLM instruction encoder (offline), loaded once; its per-string cache is shared."""
    return TextEncoder()
