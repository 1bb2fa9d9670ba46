"""``funcmem serve``'s user errors are one line on stderr, status 2, no traceback."""

import pytest

from helpers import user_error

pytestmark = pytest.mark.usefixtures("keep_threads")  # commands set torch's threads (--threads)


def test_serve_without_a_run_is_one_line(capsys, tmp_path):
    assert user_error(capsys, ["--threads", "1", "serve", "--run", str(tmp_path / "nope")]) == (
        f"error: {tmp_path / 'nope'} is not a run directory (no config.json); run `funcmem demo` first")


def test_serve_with_a_bad_port_is_one_line(capsys, tmp_path):
    line = user_error(capsys, ["serve", "--run", str(tmp_path), "--port", "abc"])
    assert line == "error: funcmem serve: argument --port: invalid int value: 'abc' (see funcmem serve --help)"
