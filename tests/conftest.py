"""Fixtures every test may use. Plain helpers (small bases, ``CASES`` / ``build``, ``random_lora``)
are in ``helpers.py``.

The tests mirror the package: tests/ (and tests/layers, tests/benchmarks) test the core, which
needs no extra; tests/editing and tests/serve test the application. With the core alone
(``pip install -e ".[test-core]"``, ``make test-core``) the application's folders are not collected.
"""

import importlib.util
import os

import pytest
import torch

from funcmem.threads import choose_threads

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "OMP_NUM_THREADS" not in os.environ:  # the CLI's choice: half the free cores (two beside a busy process crawl)
    torch.set_num_threads(choose_threads()[0])

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
EDITING_EXTRA = ("PIL", "skimage", "sklearn", "matplotlib", "transformers")  # what funcmem[editing] installs
MISSING = [m for m in EDITING_EXTRA if importlib.util.find_spec(m) is None]
collect_ignore = ["editing", "serve"] if MISSING else []


def pytest_report_header(config):
    if MISSING:
        return f"core only: tests/editing and tests/serve not collected ({', '.join(MISSING)} not installed)"


@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from threads; on a busy 2-core machine waiting for them dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keep_threads():
    """For tests that run commands (they set torch's threads): the tests after them keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hywu_fixture():
    path = os.path.join(SHARED, "fixtures", "hywu-ref-a")
    if not os.path.isdir(path):
        pytest.skip(f"HY-WU fixture not found at {path} (../shared beside the repo)")
    return path
