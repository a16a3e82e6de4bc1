"""`minimind serve RUN_DIR`: an OpenAI-compatible HTTP server with a web chat page at /.

    minimind serve runs/sft [--host 127.0.0.1 --port 8998 --lora DIR --api-key KEY
                             --max-concurrency 4 --device auto --max-tokens-cap 2048]

Any OpenAI client works against `http://HOST:PORT/v1` (see minimind/serve/app.py for the
routes). The server binds the loopback interface unless told otherwise; with `--host 0.0.0.0`
give it an `--api-key` (or set MINIMIND_API_KEY). The heavy imports (FastAPI, uvicorn, torch)
happen in `build`, so `minimind --help` stays fast.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from minimind.errors import ConfigError


def add_arguments(p: Any) -> None:
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run directory (chat run, or a pretrained run for /v1/completions)"
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8998)
    p.add_argument("--lora", metavar="DIR", help="apply this LoRA adapter (from `minimind lora`) at load")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MINIMIND_API_KEY"),
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on /v1 (default $MINIMIND_API_KEY; / and /health stay open)",
    )
    p.add_argument("--model-name", help="model id in the API (default: the run directory's name)")
    p.add_argument(
        "--max-concurrency", type=int, default=4, metavar="N", help="generations running at once; others queue"
    )
    p.add_argument(
        "--max-tokens-cap", type=int, default=2048, metavar="N", help="upper bound on max_tokens (and the default)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=0, metavar="N", help="torch CPU threads (0: torch's default)")


def build(args: Any) -> Any:
    """The FastAPI app for these arguments (model loaded, adapter applied)."""
    import torch

    from minimind.inference import open_run
    from minimind.serve.app import Server, create_app

    if args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")
    if args.max_tokens_cap < 1:
        raise ConfigError("--max-tokens-cap must be at least 1")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key must not be empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = open_run(args.run_dir, args.device, args.lora)
    name = args.model_name or Path(args.run_dir).resolve().name
    server = Server(run, name, args.api_key, args.max_concurrency, args.max_tokens_cap)
    return create_app(server)


def main(args: Any) -> None:
    import uvicorn

    app = build(args)
    if args.host not in ("127.0.0.1", "localhost", "::1") and args.api_key is None:
        print(f"warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    print(f"chat page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


@contextmanager
def background(app: Any, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread (for notebooks and tests); yields the base URL. Port 0 picks a free one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="minimind-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
