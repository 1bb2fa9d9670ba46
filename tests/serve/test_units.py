"""Small parts on their own: the LRU cache, the metrics text, the loop-back check of the load test,
the engine's fixed-size chunks."""

from __future__ import annotations

import pytest
import torch

from funcmem.lora import LoRA
from funcmem.serve.cache import LoRACache
from funcmem.serve.loadtest import check_loopback
from funcmem.serve.metrics import Metrics, parse


def _lora(v: float) -> LoRA:
    return LoRA({"x": (torch.full((1, 2, 3), v), torch.zeros(1, 3, 2))}, 1.0)


def test_lru_cache_drops_the_least_recently_used():
    cache = LoRACache(2)
    cache.put("a", _lora(1))
    cache.put("b", _lora(2))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", _lora(3))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert len(cache) == 2 and cache.hits == 3 and cache.misses == 1
    off = LoRACache(0)
    off.put("a", _lora(1))
    assert off.get("a") is None


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
    assert "only targets a server on this machine" in capsys.readouterr().out
