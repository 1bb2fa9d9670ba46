"""matplotlib for the application's figures (reports, full photos), on the file-only Agg backend."""

from __future__ import annotations


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: the core never needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
