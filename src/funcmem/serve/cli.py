"""``funcmem serve`` and ``funcmem loadtest`` (registered through ``cli.COMMAND_MODULES``)."""

from __future__ import annotations

import json


def cmd_serve(args) -> int:
    import uvicorn

    from .app import Service, create_app
    from .limits import ServeConfig

    config = ServeConfig(max_batch=1 if args.no_batching else args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_queue=args.max_queue, chunk=args.chunk, cache_size=args.cache_size,
                         max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                         timeout_s=args.timeout)
    print(f"loading {args.run} ...", flush=True)
    service = Service.from_run(args.run, config)
    print(f"serving on http://{args.host}:{args.port}/  (max batch {config.max_batch}, chunk {config.chunk} tiles)",
          flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_loadtest(args) -> int:
    from .loadtest import format_report, run_loadtest

    try:
        result = run_loadtest(args.url, args.concurrency, args.requests, args.duration, (args.size, args.size),
                              args.repeat, args.timeout)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0 if result["errors"] == 0 else 1


def add_commands(sub) -> None:
    from .limits import ServeConfig

    d = ServeConfig()
    s = sub.add_parser("serve", help="HTTP service and web page on a trained run (edits, LoRA export, metrics)")
    s.add_argument("--run", required=True, help="a run directory written by `funcmem demo`")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=d.max_batch, help="most requests computed together")
    s.add_argument("--no-batching", action="store_true", help="one request at a time (= --max-batch 1)")
    s.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for company")
    s.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before answering 503")
    s.add_argument("--chunk", type=int, default=d.chunk, help="tiles per model call (calls are padded to it)")
    s.add_argument("--cache-size", type=int, default=d.cache_size, help="generated LoRAs kept (0: no cache)")
    s.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20)
    s.add_argument("--max-pixels", type=int, default=d.max_pixels)
    s.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before a request gets 504")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=cmd_serve)
    t = sub.add_parser("loadtest", help="concurrent edit requests against a local `funcmem serve`")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="loopback only")
    t.add_argument("--concurrency", type=int, default=32)
    t.add_argument("--requests", type=int, default=500)
    t.add_argument("--duration", type=float, default=300.0, help="no new request after this many seconds")
    t.add_argument("--size", type=int, default=64, help="side of the square test image")
    t.add_argument("--repeat", action="store_true", help="send the same image every time (LoRA cache hits)")
    t.add_argument("--timeout", type=float, default=60.0)
    t.add_argument("--json", default=None, help="also write the figures to this JSON file")
    t.set_defaults(func=cmd_loadtest)
