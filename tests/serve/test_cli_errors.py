"""``funcmem serve``'s user errors are one line on stderr, status 2, no traceback."""

import pytest

from helpers import user_error

pytestmark = pytest.mark.usefixtures("keep_threads")  # commands set torch's threads (--threads)


def test_serve_without_a_run_is_one_line(capsys, tmp_path):
    assert user_error(capsys, ["--threads", "1", "serve", "--run", str(tmp_path / "nope")]) == (
        f"error: {tmp_path / 'nope'} is not a run directory (no config.json); run `funcmem demo` first")


def test_serve_with_a_bad_port_is_one_line(capsys, tmp_path):
    line = user_error(capsys, ["serve", "--run", str(tmp_path), "--port", "abc"])
    assert line == "error: funcmem serve: argument --port: expected a port number, got 'abc' (see funcmem serve --help)"
    line = user_error(capsys, ["serve", "--run", str(tmp_path), "--port", "99999"])
    assert line == "error: funcmem serve: argument --port: a port is 1 to 65535, got 99999 (see funcmem serve --help)"


def test_loadtest_errors_are_one_line_on_stderr(capsys):
    line = user_error(capsys, ["loadtest", "--url", "http://127.0.0.1:9", "--concurrency", "0"])
    assert line == "error: concurrency must lie in [1, 256], got 0"
    line = user_error(capsys, ["loadtest", "--url", "http://127.0.0.1:9", "--requests", "1"])  # nothing listens there
    assert line.startswith("error: cannot connect to http://127.0.0.1:9") and "start `funcmem serve` first" in line
