"""Cross-request batching: concurrent requests are computed in shared batches, and each one's
image is bit for bit the image it gets when sent alone."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import png_bytes

INSTRUCTIONS = ["blur the image", "make it brighter", "add film grain", "cooler tones please",
                "sharpen the details", "make it look old"]
SIZES = [(70, 45), (32, 32), (48, 64), (40, 33), (64, 64), (33, 90)]  # 1 to 10 tiles: batches cross chunk edges


async def _send_all(app, concurrent: bool) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
        def request(i):
            files = {"image": (f"p{i}.png", png_bytes(*SIZES[i], seed=20 + i), "image/png")}
            return client.post("/v1/edit", files=files, data={"instruction": INSTRUCTIONS[i]})

        if concurrent:
            return await asyncio.gather(*(request(i) for i in range(len(INSTRUCTIONS))))
        return [await request(i) for i in range(len(INSTRUCTIONS))]


def test_concurrent_requests_are_batched_and_equal_sequential_ones_bit_for_bit(app, service, monkeypatch):
    monkeypatch.setattr(service.batcher, "max_wait_s", 0.5)  # a slow CPU must not split the burst
    service.cache._items.clear()
    sequential = asyncio.run(_send_all(app, concurrent=False))
    assert all(r.status_code == 200 for r in sequential), [r.text for r in sequential]
    assert {r.headers["X-Batch-Size"] for r in sequential} == {"1"}
    service.cache._items.clear()  # the batch must generate again, not reuse the sequential LoRAs
    concurrent = asyncio.run(_send_all(app, concurrent=True))
    assert all(r.status_code == 200 for r in concurrent)
    assert all(r.headers["X-Cache"] == "miss" for r in concurrent)
    assert max(int(r.headers["X-Batch-Size"]) for r in concurrent) > 1
    for s, c in zip(sequential, concurrent):
        assert s.content == c.content  # the PNG bytes: every pixel equal
        assert s.headers["X-Manifold-Point"] == c.headers["X-Manifold-Point"]
    assert len({r.content for r in concurrent}) == len(INSTRUCTIONS)  # and they are different edits


def test_metrics_report_batches_larger_than_one(client):
    from funcmem.serve.metrics import parse

    m = parse(client.get("/metrics").text)
    assert m["funcmem_batch_size_count"] > m['funcmem_batch_size_bucket{le="1"}']  # some batch held > 1 request


def test_a_batch_keeps_to_its_tile_budget_and_lighter_items_fill_the_room():
    """Items weigh their tiles; a batch never passes ``max_weight`` (one heavier item goes alone);
    an item that does not fit waits for the next batch, which it opens, and later lighter items
    fill the room meanwhile."""
    from funcmem.serve.batching import Batcher

    batches = []
    batcher = Batcher(lambda items: batches.append(list(items)) or items, max_batch=16, max_wait_s=0.5,
                      max_queue=16, weight=lambda item: item, max_weight=10)

    async def main():
        return await asyncio.gather(*(batcher.submit(w) for w in (4, 5, 3, 12, 2, 2)))

    try:
        assert asyncio.run(main()) == [4, 5, 3, 12, 2, 2]
    finally:
        batcher.stop()
    assert batches == [[4, 5], [3, 2, 2], [12]]
