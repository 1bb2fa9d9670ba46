"""``funcmem serve``: the HTTP service on a trained run (registered in ``funcmem.cli.COMMANDS``).

Exposure is refused unless it is safe: a ``--host`` other than loopback needs an API key
(``FUNCMEM_API_KEY`` or ``--api-key``); see docs/serving.md.
"""

from __future__ import annotations

import argparse
import os

import uvicorn

from .app import Service, create_app
from .connections import guarded_protocol
from .limits import ServeConfig
from .logs import limit_logs
from .security import check_exposure

H11_MAX_HEADER_BYTES = 16 * 1024  # request line + headers; larger is a 400 from h11


def make_server(service: Service, host: str, port: int, log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server for ``service`` with the connection limits of ``service.config`` (a read
    deadline, at most ``max_connections``, short keep-alive, bounded headers) and bounded logs."""
    cfg = service.config
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level,
                            http=guarded_protocol(cfg.read_timeout_s, cfg.max_connections),
                            timeout_keep_alive=cfg.keep_alive_s, limit_concurrency=cfg.max_connections + 1,
                            backlog=cfg.max_connections,  # also how many asyncio accepts at once, before any close
                            h11_max_incomplete_event_size=H11_MAX_HEADER_BYTES, server_header=False,
                            access_log=log_level in ("debug", "info", "trace"))
    limit_logs()  # after uvicorn.Config configured the loggers
    return uvicorn.Server(config)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    key = args.api_key if args.api_key is not None else os.environ.get("FUNCMEM_API_KEY") or None
    check_exposure(args.host, key)
    return ServeConfig(max_batch=1 if args.no_batching else args.max_batch, max_wait_ms=args.max_wait_ms,
                       max_queue=args.max_queue, chunk=args.chunk, cache_mb=args.cache_mb,
                       max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                       max_tiles=args.max_tiles, max_batch_tiles=args.max_batch_tiles,
                       image_memory_mb=args.image_memory_mb, timeout_s=args.timeout,
                       api_key=key, bind_host=args.host, allowed_hosts=tuple(args.allowed_host), docs=args.docs,
                       read_timeout_s=args.read_timeout, max_connections=args.max_connections)


def run_cli(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # refuses an unsafe exposure before loading anything
    print(f"loading {args.run} ...", flush=True)
    service = Service.from_run(args.run, config)
    auth = "API key required" if config.api_key else "no API key (loopback only)"
    print(f"serving on http://{args.host}:{args.port}/  ({auth}; max batch {config.max_batch}, "
          f"chunk {config.chunk} tiles, at most {config.max_tiles} tiles an image)", flush=True)
    make_server(service, args.host, args.port, args.log_level).run()
    return 0


def port(text: str) -> int:
    """An argparse ``type``: a TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1 to 65535, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``funcmem serve``'s options."""
    d = ServeConfig()
    parser.add_argument("--run", required=True, help="a run directory written by `funcmem demo`")
    parser.add_argument("--host", default="127.0.0.1", help="any other than loopback needs an API key")
    parser.add_argument("--port", type=port, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (prefer the "
                        "FUNCMEM_API_KEY environment variable: a command line is visible to other users)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a name clients may send in the Host header (repeatable; '*': any); IP addresses, "
                        "localhost and --host are always allowed")
    parser.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json")
    parser.add_argument("--max-batch", type=int, default=d.max_batch, help="most requests computed together")
    parser.add_argument("--no-batching", action="store_true", help="one request at a time (= --max-batch 1)")
    parser.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms, help="how long a batch waits for company")
    parser.add_argument("--max-queue", type=int, default=d.max_queue, help="requests in flight before answering 503")
    parser.add_argument("--chunk", type=int, default=d.chunk, help="tiles per model call (calls are padded to it)")
    parser.add_argument("--cache-mb", type=float, default=d.cache_mb, help="MiB of generated LoRAs kept (0: no cache)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20)
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels)
    parser.add_argument("--max-tiles", type=int, default=d.max_tiles,
                        help="most tiles an image is cut into (larger images are edited at a coarser scale)")
    parser.add_argument("--max-batch-tiles", type=int, default=d.max_batch_tiles, help="most tiles in one batch")
    parser.add_argument("--image-memory-mb", type=float, default=d.image_memory_mb,
                        help="MiB of decoded images held at once (8 bytes a pixel); beyond, 503")
    parser.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds before a request gets 504")
    parser.add_argument("--read-timeout", type=float, default=d.read_timeout_s,
                        help="seconds a connection has to send a whole request")
    parser.add_argument("--max-connections", type=int, default=d.max_connections)
    parser.add_argument("--log-level", default="warning")
