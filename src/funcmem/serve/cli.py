"""``funcmem serve``: the HTTP service on a trained run (registered in ``funcmem.cli.COMMANDS``)."""

from __future__ import annotations

import argparse

import uvicorn

from .app import Service, create_app
from .limits import ServeConfig


def run_cli(args: argparse.Namespace) -> int:
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem serve``'s options."""
    d = ServeConfig()
    parser.add_argument("--run", required=True, help="a run directory written by `funcmem demo`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="most requests computed together")
    parser.add_argument("--no-batching", action="store_true", help="one request at a time (= --max-batch 1)")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for company")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="waiting requests before answering 503")
    parser.add_argument("--chunk", type=int, default=d.chunk, help="tiles per model call (calls are padded to it)")
    parser.add_argument("--cache-size", type=int, default=d.cache_size, help="generated LoRAs kept (0: no cache)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels)
    parser.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before a request gets 504")
    parser.add_argument("--log-level", default="warning")
