"""Exposure: the API key (constant-time, every route but /healthz and the page), the Host check
(DNS rebinding), cross-site POSTs, /docs off, /healthz without paths, and the refusal to serve
beyond loopback without a key."""

from __future__ import annotations

import hmac

import pytest
from fastapi.testclient import TestClient

from funcmem.serve import security
from funcmem.serve.app import Service, create_app
from funcmem.serve.limits import ServeConfig
from funcmem.serve.security import check_exposure, is_loopback

from .conftest import LIMITS, png_bytes

KEY = "k" * 12 + "-secret-0123"


def keyed_client(service, **config):
    """A TestClient on a new app around the session's engine, with other settings."""
    other = Service(service.engine, ServeConfig(**{**LIMITS, **config}), service.manifold)
    return TestClient(create_app(other)), other


def edit(client, headers=None, **kw):
    return client.post("/v1/edit", files={"image": ("p.png", png_bytes(32, 32, seed=kw.pop("seed", 0)), "image/png")},
                       data={"instruction": "make it brighter"}, headers=headers or {}, **kw)


@pytest.fixture(scope="module")
def keyed(service):
    client, other = keyed_client(service, api_key=KEY)
    with client:
        yield client
    other.batcher.stop()


def test_every_route_but_healthz_and_the_page_needs_the_key(keyed, monkeypatch):
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    for path in ("/v1/manifold", "/metrics"):
        r = keyed.get(path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        assert r.json() == {"error": "this server needs an API key: send 'Authorization: Bearer KEY'", "code": 401}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}, {"Authorization": KEY}):
        assert edit(keyed, headers).status_code == 401, headers
    assert keyed.post("/v1/lora").status_code == 401  # refused before the body is looked at
    ok = edit(keyed, {"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    assert keyed.get("/v1/manifold", headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert all(len(a) == len(b) == 32 for a, b in calls) and len(calls) >= 8  # digests compared, in constant time
    assert keyed.get("/healthz").json()["auth"] is True
    page = keyed.get("/")
    assert page.status_code == 200 and 'id="apikey"' in page.text and "Authorization" in page.text


def test_healthz_shows_no_path(client, tiny_run_dir):
    body = client.get("/healthz")
    assert body.status_code == 200 and body.json()["status"] == "ok" and body.json()["auth"] is False
    assert str(tiny_run_dir) not in body.text and tiny_run_dir.name not in body.text


def test_docs_and_openapi_are_off_by_default_and_on_when_asked(client, service):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404
    docs, other = keyed_client(service, docs=True)
    with docs:
        assert docs.get("/docs").status_code == 200 and docs.get("/openapi.json").json()["info"]["title"] == "funcmem"
    other.batcher.stop()


@pytest.mark.parametrize("host, ok", [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("[::1]:8000", True), ("10.1.2.3", True),
    ("app.localhost", True), ("testserver", True),  # allowed by the tests' config
    ("evil.example", False), ("evil.example:8000", False), ("127.0.0.1.nip.io", False), ("", False),
])
def test_the_host_header_must_be_an_address_or_an_allowed_name(client, host, ok):
    r = client.get("/healthz", headers={"Host": host})
    assert (r.status_code == 200) == ok, (host, r.text)
    if not ok:
        assert r.status_code == 400 and "is not one this server answers to" in r.json()["error"]
        assert edit(client, {"Host": host}).status_code == 400  # DNS rebinding: refused before anything runs


def test_allowed_host_names_and_the_wildcard(service):
    named, a = keyed_client(service, allowed_hosts=("photos.example.org",))
    anything, b = keyed_client(service, allowed_hosts=("*",))
    with named, anything:
        assert named.get("/healthz", headers={"Host": "Photos.Example.org:443"}).status_code == 200
        assert named.get("/healthz", headers={"Host": "other.example.org"}).status_code == 400
        assert anything.get("/healthz", headers={"Host": "whatever.example"}).status_code == 200
    a.batcher.stop()
    b.batcher.stop()


def test_a_cross_site_post_is_refused_and_a_same_origin_one_is_not(client):
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "http://testserver:3000"},
                    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site", "Content-Type": "text/plain"}):
        r = edit(client, headers, seed=1)
        assert r.status_code == 403 and "cross-site requests are refused" in r.json()["error"], headers
    for headers in ({}, {"Origin": "http://testserver"}, {"Origin": "https://testserver", "Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "none"}):
        assert edit(client, headers, seed=2).status_code == 200, headers
    assert client.get("/v1/manifold", headers={"Origin": "http://evil.example"}).status_code == 200  # reads are fine


def test_serving_beyond_loopback_needs_a_key():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert is_loopback(host)
        check_exposure(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match=f"refusing to serve on {host} without an API key.*FUNCMEM_API_KEY"):
            check_exposure(host, None)
        check_exposure(host, KEY)
    with pytest.raises(ValueError, match="the API key is 5 characters long; use at least 16"):
        check_exposure("0.0.0.0", "short")


def test_the_serve_command_refuses_before_loading_anything(monkeypatch, tmp_path):
    """``funcmem serve``'s own step raises the one-line ValueError (the CLI's error handler prints it)."""
    from funcmem.cli import build_parser

    def serve(*argv):
        args = build_parser(["serve", *argv]).parse_args(["serve", *argv])
        return args.run_cli(args)

    monkeypatch.delenv("FUNCMEM_API_KEY", raising=False)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without an API key"):
        serve("--run", str(tmp_path / "no-run-here"), "--host", "0.0.0.0")  # not FileNotFoundError: nothing loaded
    monkeypatch.setenv("FUNCMEM_API_KEY", KEY)
    with pytest.raises(FileNotFoundError):  # the key is read from the environment: it goes on to load the run
        serve("--run", str(tmp_path / "no-run-here"), "--host", "0.0.0.0")
