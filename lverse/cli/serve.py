"""``lverse serve``: a local web page to try both directions of a bundle (docs/serve.md).

    lverse serve                                   # the shipped Shapes bundle, http://127.0.0.1:8000
    lverse serve --checkpoint DIR --port 8080 --device cuda

Text -> image with the images appearing as their rows are drawn, image -> text from an upload or
a drop, and the two round trips; requests wait in one queue per model (their place shown) and can
be cancelled. The page ships in the package and loads nothing from elsewhere. Needs the
``serve`` extra (``pip install 'lverse[serve]'``). Problems (port in use, missing bundle,
missing extra) end with one ``error:`` line and exit code 1.
"""
from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

EXIT_ERROR = 1
NEEDS = ("fastapi", "uvicorn", "multipart")  # multipart: python-multipart, for uploads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lverse serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A local web page (and an HTTP API) to try both directions of a bundle: text -> image, "
                    "image -> text and the round trips.\nRequests wait in one queue per model and can be cancelled; "
                    "the page loads nothing from the network. Details: docs/serve.md.",
        epilog="examples:\n  lverse serve                          # the shipped Shapes bundle on http://127.0.0.1:8000\n"
               "  lverse serve --checkpoint DIR --device cuda --port 8080")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint directory (default: $LVERSE_CHECKPOINT or the shipped checkpoints/shapes)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; there is no login)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0: any free port)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available; the default), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="BiART precision (default fp32; AugVAE always runs in fp32)")
    p.add_argument("--batch-size", type=int, default=64, help="rows decoded at once (default 64)")
    lim = p.add_argument_group("limits on one request")
    lim.add_argument("--max-candidates", type=int, default=128, help="candidates per image or caption (default 128)")
    lim.add_argument("--max-keep", type=int, default=8, help="images kept per prompt (default 8)")
    lim.add_argument("--max-upload-mb", type=float, default=8.0, help="size of an uploaded image in MB (default 8)")
    lim.add_argument("--max-waiting", type=int, default=16, help="requests waiting in the queue (default 16)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="the web server's log level (default warning)")
    return p


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, or an ``OSError`` saying why not in one line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free; one in use is not
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use (another lverse serve?); "
                          f"pass --port N, or --port 0 for any free port") from None
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        print(f"error: lverse serve needs the serve extra: pip install 'lverse[serve]' "
              f"(missing: {', '.join(missing)})", file=sys.stderr)
        return EXIT_ERROR
    for name in ("batch_size", "max_candidates", "max_keep", "max_waiting"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", file=sys.stderr)
            return EXIT_ERROR
    if not args.max_upload_mb > 0:
        print(f"error: --max-upload-mb must be > 0, got {args.max_upload_mb}", file=sys.stderr)
        return EXIT_ERROR

    import uvicorn

    from lverse.inference.pipeline import LVersePipeline
    from lverse.serve.app import create_app
    from lverse.serve.work import Limits, Model

    try:
        sock = listen(args.host, args.port)
        pipe = LVersePipeline.load(args.checkpoint, device=args.device, precision=args.precision)
        limits = Limits(args.max_candidates, args.max_keep, args.max_upload_mb, args.max_waiting)
        model = Model(pipe, limits, args.batch_size)
    except (ValueError, OSError, RuntimeError) as e:
        if os.environ.get("LVERSE_DEBUG"):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_ERROR
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lverse serve: http://{shown}:{port}/  (checkpoint {pipe.path}, {pipe.device}; Ctrl-C stops)", flush=True)
    if host not in ("127.0.0.1", "::1", "localhost"):
        print(f"warning: listening on {host}: anyone who can reach this machine can use the page (there is no login)",
              file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(create_app(model), log_level=args.log_level))
    server.run(sockets=[sock])
    return 0
