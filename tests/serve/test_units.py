"""Small parts on their own: the LRU cache, the metrics text, the loop-back check of the load test,
the engine's fixed-size chunks."""

from __future__ import annotations

import pytest
import torch

from funcmem.lora import LoRA
from funcmem.serve.cache import LoRACache, lora_bytes
from funcmem.serve.loadtest import check_loopback
from funcmem.serve.metrics import Metrics, parse


def _lora(v: float, rows: int = 1) -> LoRA:
    """rows x (6 + 6) float32 numbers: 48 bytes a row."""
    return LoRA({"x": (torch.full((rows, 2, 3), float(v)), torch.zeros(rows, 3, 2))}, 1.0)


def test_lru_cache_is_bounded_in_bytes_and_drops_the_least_recently_used():
    assert lora_bytes(_lora(1, rows=3)) == 3 * 48
    cache = LoRACache(max_bytes=4 * 48)
    cache.put("a", _lora(1))
    cache.put("b", _lora(2, rows=2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", _lora(3))  # 4 rows: full, nothing dropped
    assert len(cache) == 3 and cache.bytes == 4 * 48
    cache.put("d", _lora(4))  # one row too many: b, the least recently used, goes (both its rows)
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    assert cache.bytes == 3 * 48 and cache.hits == 4 and cache.misses == 1
    cache.put("big", _lora(5, rows=5))  # larger than the whole cache: not kept, nothing dropped
    assert cache.get("big") is None and len(cache) == 3
    cache.put("a", _lora(6, rows=2))  # replacing an entry counts its new size once
    assert cache.bytes == 4 * 48 and float(cache.get("a").factors["x"][0][0, 0, 0]) == 6
    off = LoRACache(0)
    off.put("a", _lora(1))
    assert off.get("a") is None and off.bytes == 0


def test_metrics_render_as_prometheus_text():
    m = Metrics()
    m.request("/v1/edit", 200, 0.03)
    m.request("/v1/edit", 422, 0.001)
    m.batch(3, 7, 1)
    values = parse(m.render())
    assert values['funcmem_requests_total{endpoint="/v1/edit",code="200"}'] == 1
    assert values['funcmem_request_seconds_bucket{endpoint="/v1/edit",le="0.05"}'] == 2
    assert values['funcmem_request_seconds_bucket{endpoint="/v1/edit",le="0.025"}'] == 1
    assert values["funcmem_batch_size_sum"] == 3 and values['funcmem_batch_size_bucket{le="2"}'] == 0
    assert values["funcmem_lora_cache_hits_total"] == 1 and values["funcmem_lora_cache_misses_total"] == 2


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:80", "http://127.3.4.5"])
def test_loadtest_accepts_loopback(url):
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "ftp://127.0.0.1", "127.0.0.1:8000",
                                 "http://0.0.0.0:8000"])
def test_loadtest_refuses_anything_else(url):
    with pytest.raises(ValueError):
        check_loopback(url)


def test_loadtest_command_refuses_a_remote_url(capsys):
    from funcmem.cli import main

    assert main(["loadtest", "--url", "http://192.168.1.2:8000", "--requests", "1"]) == 2
    assert "only targets a server on this machine" in capsys.readouterr().err
