"""HTTP service and web page on a trained editing run (``funcmem serve``).

    app.py          routes, request parsing, ``Service`` (engine + batcher + cache + metrics)
    engine.py       the batched, chunked edit of many requests (``EditEngine``)
    batching.py     cross-request batching on one worker thread (``Batcher``)
    cache.py        bounded LRU cache of generated LoRAs
    limits.py       settings, errors, upload size guard
    manifold.py     where a request's LoRA lands on the parameter manifold
    lora_export.py  a request's LoRA as a zip of PEFT adapters
    metrics.py      Prometheus text
    loadtest.py     ``funcmem loadtest``
    static/         the web page

Needs the ``serve`` extra (fastapi, uvicorn, python-multipart).
"""
