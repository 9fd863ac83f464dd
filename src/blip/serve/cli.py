"""`blip serve`: load models once and serve them over HTTP (FastAPI + uvicorn).

    blip serve --model caption=Salesforce/blip-image-captioning-base --model vqa=Salesforce/blip-vqa-base
    blip serve --model ./my-checkpoint --port 8080 --token-env BLIP_TOKEN
    blip batch embed -m Salesforce/blip-itm-base-coco -i photos/ -o photos-embedded/
    blip serve --model itm=Salesforce/blip-itm-base-coco --index photos=photos-embedded/    # POST /v1/retrieve

An index goes with the served model whose checkpoint embedded it (the index records its fingerprint), or with the one
`--index NAME=DIR@MODEL` names. A folder without an index, an unknown @MODEL or a misused flag exit 2 at once; an
index that does not fit its model (another checkpoint, no ITC head) fails the start after loading, exit 1.

Logs go to stderr as JSON lines (one access-log line per request). SIGTERM / Ctrl-C stop taking connections,
finish the requests in flight, then exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from blip.distributed import DEFAULT_DEVICE, resolve_device
from blip.serve.retrieval import IndexSpec, check_index_folder, parse_indexes
from blip.serve.settings import MIB, ServeSettings

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a message that is itself a JSON object (the access log) is merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        parsed = None
        if message.startswith("{"):
            try:
                parsed = json.loads(message)
            except ValueError:
                parsed = None
        if isinstance(parsed, dict):
            entry.update(parsed)
        else:
            entry["message"] = message
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    p = argparse.ArgumentParser(
        prog="blip serve",
        description="Serve BLIP models over HTTP: Azure ML /score, the model card's POST / and /predict, "
        "/v1/caption|vqa|match|similarity|retrieve, /healthz, /readyz, /metrics and a web page at /.",
    )
    p.add_argument(
        "--model",
        "-m",
        action="append",
        required=True,
        metavar="[NAME=]PATH",
        help="a model to serve: hub id, local folder or .pth, optionally named (repeat for several)",
    )
    p.add_argument(
        "--index",
        action="append",
        default=[],
        metavar="[NAME=]DIR[@MODEL]",
        help="a collection to search with POST /v1/retrieve: a `blip batch embed` output folder (repeatable); it goes "
        "with the served model that embedded it, or with @MODEL",
    )
    p.add_argument("--tokenizer", help="tokenizer folder or vocab.txt, for checkpoints that ship none")
    p.add_argument("--host", default=defaults.host, help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=defaults.port)
    p.add_argument("--token", help="require this bearer token (or secret_token); prefer --token-env")
    p.add_argument("--token-env", metavar="VAR", help="read the token from this environment variable")
    p.add_argument(
        "--device", default=DEFAULT_DEVICE, help="auto (a GPU when there is one, else cpu), cpu, cuda, cuda:1, ..."
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass inside a batch")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch, help="rows merged into one model call")
    p.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms, help="wait for a batch to fill")
    p.add_argument("--no-batching", action="store_true", help="one request per model call (same as --max-batch 1)")
    p.add_argument("--queue-size", type=int, default=defaults.queue_size, help="requests admitted at once; 503 past")
    p.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request (503 past)")
    p.add_argument("--max-connections", type=int, default=defaults.max_connections)
    p.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / MIB)
    p.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    p.add_argument("--max-images", type=int, default=defaults.max_images, help="images per request")
    p.add_argument("--max-texts", type=int, default=defaults.max_texts, help="questions or texts per request")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens, help="cap on max_new_tokens")
    p.add_argument("--max-beams", type=int, default=defaults.max_beams, help="cap on num_beams")
    p.add_argument("--max-top-k", type=int, default=defaults.max_top_k, help="cap on /v1/retrieve top_k")
    p.add_argument("--fetch-timeout", type=float, default=defaults.fetch_total_timeout_s, help="seconds per URL")
    p.add_argument("--fetch-max-mb", type=float, default=defaults.fetch_max_bytes / MIB, help="bytes per image")
    p.add_argument("--max-redirects", type=int, default=defaults.fetch_max_redirects)
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_models(specs: list[str]) -> dict[str, str]:
    """["caption=path", "path2"] -> {"caption": "path", "<name of path2>": "path2"}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or "/" in name or os.sep in name:
            path, name = spec, Path(spec.rstrip("/")).name or spec
        if not path:
            raise ValueError(f"--model {spec!r}: no path")
        if name in models:
            raise ValueError(f"--model {spec!r}: the name {name!r} is used twice (give NAME=PATH)")
        models[name] = path
    return models


def index_specs(specs: list[str], models: dict[str, str], tokenizer: str | None = None) -> dict[str, IndexSpec]:
    """--index values, checked before any model loads: the syntax, @MODEL names, and that each folder has an index.
    Whether an index fits its model is checked once the models are loaded."""
    indexes = parse_indexes(specs, models, tokenizer)
    for name, spec in indexes.items():
        check_index_folder(name, spec)
    return indexes


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    token = args.token
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            raise ValueError(f"--token-env {args.token_env}: the variable is not set or empty")
    return ServeSettings(
        host=args.host,
        port=args.port,
        token=token or None,
        cors_origins=tuple(args.cors_origin),
        max_batch=1 if args.no_batching else args.max_batch,
        max_wait_ms=0.0 if args.no_batching else args.max_wait_ms,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        max_connections=args.max_connections,
        max_body_bytes=int(args.max_body_mb * MIB),
        max_image_pixels=args.max_image_pixels,
        max_images=args.max_images,
        max_texts=args.max_texts,
        max_new_tokens=args.max_new_tokens,
        max_beams=args.max_beams,
        max_top_k=args.max_top_k,
        fetch_total_timeout_s=args.fetch_timeout,
        fetch_max_bytes=int(args.fetch_max_mb * MIB),
        fetch_max_redirects=args.max_redirects,
    )


def model_loader(paths: dict[str, str], args: argparse.Namespace) -> Callable[[], dict[str, Blip]]:
    def load() -> dict[str, Blip]:
        import blip

        models = {}
        for name, path in paths.items():
            _logger.info("loading %s from %s", name, path)
            models[name] = blip.load(
                path, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer, batch_size=args.batch_size
            )
        return models

    return load


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware writes the access log


def cli_main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT. Returns 0 after a clean stop, 1 if loading failed, 2 on bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code or 0)
    try:
        resolve_device(args.device)  # an unusable device fails here, before binding or loading (exit 2)
        settings = settings_from_args(args)
        paths = parse_models(args.model)
        indexes = index_specs(args.index, paths, args.tokenizer)
    except ValueError as e:
        print(f"blip serve: error: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from blip.serve.app import create_app
    except ImportError as e:
        print(f"blip serve: error: {e.name} is missing: pip install 'blip-vl[serve]'", file=sys.stderr)
        return 2

    configure_logging(args.log_level)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(error: BaseException) -> None:
        failed.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(
        settings=settings, loader=model_loader(paths, args), on_load_error=on_load_error, indexes=dict(indexes)
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.timeout_s) + 5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    served = ", ".join([*paths, *(f"index {n}" for n in indexes)])
    _logger.info("serving %s on http://%s:%d", served, settings.host, settings.port)
    _quiet_after_shutdown()
    server.run()
    return 1 if failed or not server.started else 0


def _quiet_after_shutdown() -> None:
    """uvicorn shuts down gracefully on SIGTERM/SIGINT and then re-raises the signal to the handler it found; with
    this no-op handler in place the process then exits with our status (0) instead of dying by the signal."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _logger.info("stopped by signal %d", signum))


def main(argv: list[str] | None = None) -> int:
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(cli_main())
