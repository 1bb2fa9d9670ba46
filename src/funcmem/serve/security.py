"""Who may use the service: the ``Host`` header, cross-site requests and the API key (ASGI middleware).

Checked in this order on every HTTP request, before the body is read; a refusal is JSON
``{"error", "code"}`` like every other:

1. ``Host`` (400): an IP address (any: a DNS-rebinding page cannot send one, its Host is its own
   name), ``localhost``, the host the server is bound to, or a name given with ``--allowed-host``
   (``*`` allows any). A page on ``evil.example`` whose name an attacker re-points at 127.0.0.1
   reaches the socket but carries ``Host: evil.example``, and is refused.
2. Cross-site (403): a ``POST`` whose ``Origin`` is not this server's own (its host:port is not Host's), or
   whose ``Sec-Fetch-Site`` is ``cross-site`` / ``same-site``. Browsers send these headers and
   pages cannot forge them, so a page on another site cannot drive the service (a form post gets
   403, not 200); clients that are not browsers (curl, scripts) send neither and pass.
3. API key (401, with ``WWW-Authenticate: Bearer``): when the server has one, every route except
   ``PUBLIC`` needs ``Authorization: Bearer KEY``. Compared in constant time (``hmac.compare_digest``
   on SHA-256 digests, so neither the content nor the length leaks through timing).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from urllib.parse import urlsplit

PUBLIC = frozenset({"/healthz", "/"})  # health for probes; the page holds no data and asks for the key
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
MIN_KEY_CHARS = 16


def is_loopback(host: str) -> bool:
    """Whether a bind address or name only reaches this machine."""
    if host.lower() in LOOPBACK_NAMES or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None) -> None:
    """Refuse (ValueError, one line) to serve beyond this machine without a key, or with a short key."""
    if api_key is not None and len(api_key) < MIN_KEY_CHARS:
        raise ValueError(f"the API key is {len(api_key)} characters long; use at least {MIN_KEY_CHARS} (for "
                         "example: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if not is_loopback(host) and not api_key:
        raise ValueError(f"refusing to serve on {host} without an API key: anyone who can reach this machine "
                         "could use it; set FUNCMEM_API_KEY (or --api-key), or bind --host 127.0.0.1")


def _host_name(value: str) -> str:
    """The name part of a Host header value ("[::1]:80" -> "::1", "a.b:8000" -> "a.b"), lowercased."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _netloc(value: str) -> str:
    """host[:port] lowercased, without a default port (an Origin omits it, a Host may not; the
    scheme is not compared, so the check holds behind a TLS-terminating proxy)."""
    value = value.strip().lower()
    for default in (":80", ":443"):
        if value.endswith(default):
            return value[: -len(default)]
    return value


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the Host, cross-site and API-key checks of the module doc.

    Args:
        app: the wrapped ASGI app.
        api_key: None (no key needed) or the key every non-public route requires.
        bind_host: the address the server listens on (its name is always allowed).
        allowed_hosts: more names clients may use in ``Host`` (``*``: any).
    """

    def __init__(self, app, api_key: str | None = None, bind_host: str = "127.0.0.1",
                 allowed_hosts: tuple[str, ...] = ()):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        names = {n.lower().strip("[]") for n in allowed_hosts}
        self.any_host = "*" in names
        self.hosts = names | {"localhost", bind_host.lower().strip("[]")}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers") or []}
        refusal = self.refusal(scope, headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, message, extra = refusal
        body = json.dumps({"error": message, "code": status}).encode()
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]})
        await send({"type": "http.response.body", "body": body})

    def refusal(self, scope, headers: dict[str, str]) -> tuple[int, str, list] | None:
        """(status, message, extra headers) for a refused request, or None."""
        host = headers.get("host", "")
        name = _host_name(host)
        if not (self.any_host or name in self.hosts or _is_ip(name) or name.endswith(".localhost")):
            return 400, (f"the Host header {host[:100]!r} is not one this server answers to; start it with "
                         f"--allowed-host {name[:100] or 'NAME'} to allow it"), []
        if scope.get("method") not in ("GET", "HEAD", "OPTIONS") and self._cross_site(scope, headers):
            return 403, "cross-site requests are refused: send the request from this server's own page or " \
                        "from a program (no Origin header)", []
        if self.key_digest is not None and scope.get("path") not in PUBLIC and not self._authorised(headers):
            return 401, "this server needs an API key: send 'Authorization: Bearer KEY'", [
                (b"www-authenticate", b'Bearer realm="funcmem"')]
        return None

    def _cross_site(self, scope, headers: dict[str, str]) -> bool:
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return True
        origin = headers.get("origin")
        if origin is None:
            return False
        if origin.strip().lower() == "null":  # a sandboxed frame or a file: page
            return True
        return _netloc(urlsplit(origin).netloc) != _netloc(headers.get("host", ""))

    def _authorised(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        same = hmac.compare_digest(given, self.key_digest)  # always compared: no early exit to time
        return same and scheme.lower() == "bearer"
