"""HTTP service and web page on a trained editing run (``funcmem serve``).

    app.py          routes, request parsing, ``Service`` (engine + batcher + cache + admission + metrics)
    engine.py       the batched, chunked edit of many requests (``EditEngine``); drops expired requests
    batching.py     cross-request batching on one worker thread (``Batcher``), by weight, backfilled
    admission.py    requests and image bytes in flight, decided before decoding (503)
    cache.py        LRU cache of generated LoRAs, bounded in bytes
    limits.py       settings, errors, upload size guard
    security.py     Host, cross-site and API-key checks (``Guard``); the exposure refusal
    connections.py  read deadline and connection cap (a uvicorn h11 protocol)
    logs.py         rate-limited logs
    manifold.py     where a request's LoRA lands on the parameter manifold
    lora_export.py  a request's LoRA as a zip of PEFT adapters
    metrics.py      Prometheus text
    loadtest.py     ``funcmem loadtest``
    static/         the web page

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart). How to expose it safely, and the
measurements behind its limits: docs/serving.md.
"""
