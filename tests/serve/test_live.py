"""Against a real server on 127.0.0.1 (uvicorn in a thread): the load test's figures, and the web
page in headless Chromium driven by Playwright (the system browser; nothing is downloaded)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from funcmem.editing.data import load_photos
from funcmem.serve.app import Service
from funcmem.serve.limits import ServeConfig
from funcmem.serve.loadtest import format_report, run_loadtest

from .conftest import LIMITS, serve_in_thread


ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


KEY = "browser-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server(service):
    """A live server on the session's engine that needs an API key."""
    other = Service(service.engine, ServeConfig(**{**LIMITS, "api_key": KEY}), service.manifold)
    url, stop = serve_in_thread(other)
    yield url
    stop()
    other.batcher.stop()


def test_loadtest_against_a_live_server(live_server):
    r = run_loadtest(live_server, concurrency=4, requests=8, size=(32, 32), timeout_s=120)
    assert r["ok"] == 8 and r["errors"] == 0
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p95"] <= r["latency_ms"]["p99"]
    assert r["throughput_rps"] > 0 and r["batches"] >= 1 and r["mean_batch_size"] >= 1
    assert 100 < r["rss_peak_mb"] < 100_000 and list(r["phases"]) == ["normal"]


@pytest.mark.slow
def test_loadtest_with_the_attack_mix_reports_both_phases(keyed_server):
    r = run_loadtest(keyed_server, concurrency=2, requests=6, size=(32, 32), timeout_s=120, api_key=KEY,
                     attack=True, slow=8, attackers=1)
    assert list(r["phases"]) == ["normal", "attack", "after"]
    normal, attack = r["phases"]["normal"], r["phases"]["attack"]
    assert normal["ok"] == attack["ok"] == r["phases"]["after"]["ok"] == 6  # still served beside the attackers
    wide, big = attack["attack"]["wide"], attack["attack"]["big"]
    assert set(wide) == set(big) == {"413"} and sum(wide.values()) >= 1  # the tests' limits: 16 tiles, 1 MP
    for phase in r["phases"].values():
        assert phase["rss_peak_mb"] >= phase["rss_end_mb"] > 100
    report = format_report(r)
    assert "attack / alone (mean of before and after): throughput x" in report and "server RSS peak MiB" in report
    with pytest.raises(ValueError, match="the server needs an API key: set FUNCMEM_API_KEY"):
        run_loadtest(keyed_server, concurrency=1, requests=1, size=(32, 32), timeout_s=60)


def _chromium() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def test_web_page_edits_an_uploaded_photo_in_a_real_browser(live_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (install it with `apt-get install -y chromium`; .ci/run does)")
    photo = tmp_path / "chelsea.jpg"  # a real photo (scikit-image's cat), made small: 3 x 5 tiles
    image = load_photos(["chelsea"])[0].image  # (3, 300, 451)
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    Image.fromarray(array).resize((96, 64), Image.LANCZOS).save(photo, quality=92)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(live_server + "/")
            page.wait_for_selector("#examples .chip")  # example instructions come from /v1/manifold
            page.set_input_files("#file", str(photo))
            page.click("#examples .chip >> nth=1")
            assert page.input_value("#instruction")
            page.click("#submit")
            page.wait_for_function("document.getElementById('result').naturalWidth > 0", timeout=120_000)
            size = page.evaluate("[document.getElementById('result').naturalWidth,"
                                 " document.getElementById('result').naturalHeight]")
            assert size == [96, 64]
            assert page.text_content("#status").startswith("done")
            assert page.get_attribute("#download", "href").startswith("blob:")
            page.screenshot(path=str(ARTIFACTS / "serve-web-page.png"), full_page=True)
        finally:
            browser.close()
    assert Image.open(ARTIFACTS / "serve-web-page.png").size[0] > 0


def test_web_page_asks_for_the_api_key_and_sends_it(keyed_server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (test extra)")
    executable = _chromium()
    if executable is None:
        pytest.skip("no Chromium on this machine (install it with `apt-get install -y chromium`; .ci/run does)")
    photo = tmp_path / "small.png"
    Image.new("RGB", (40, 32), (30, 140, 220)).save(photo)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(keyed_server + "/")
            page.wait_for_selector("#keyrow:not([hidden])")  # /v1/manifold said 401: the page asks
            assert "API key" in page.text_content("#status")
            page.fill("#apikey", "a wrong key")
            page.click("#usekey")
            page.wait_for_function("document.getElementById('status').textContent.includes('not accepted')")
            page.fill("#apikey", KEY)
            page.click("#usekey")
            page.wait_for_selector("#examples .chip")  # the manifold loaded with the key
            page.set_input_files("#file", str(photo))
            page.fill("#instruction", "make it brighter")
            page.click("#submit")
            page.wait_for_function("document.getElementById('result').naturalWidth > 0", timeout=120_000)
            assert page.text_content("#status").startswith("done")
        finally:
            browser.close()
