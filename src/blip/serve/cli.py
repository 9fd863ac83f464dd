"""`blip serve`: load models once and serve them over HTTP (FastAPI + uvicorn).

    blip serve --model caption=Salesforce/blip-image-captioning-base --model vqa=Salesforce/blip-vqa-base
    blip serve --model ./my-checkpoint --port 8080 --token-env BLIP_TOKEN
    blip batch embed -m Salesforce/blip-itm-base-coco -i photos/ -o photos-embedded/
    blip serve --model itm=Salesforce/blip-itm-base-coco --index photos=photos-embedded/    # POST /v1/retrieve

An index goes with the served model whose checkpoint embedded it (the index records its fingerprint), or with the one
`--index NAME=DIR@MODEL` names.

Everything is checked before the server listens: flags, index folders, the device, the port (bound, not listening),
then the models are loaded and the indexes opened. Any failure there (a misused flag, `--device cuda` without CUDA,
a port in use, a model that cannot load, an index that does not fit its model) prints one line, `blip serve: error:
...`, and exits 2 with nothing served.

Logs go to stderr as JSON lines (one access-log line per request; a message repeated more than `LOG_BURST` times a
minute is dropped past that, with a count on the next one let through). SIGTERM / Ctrl-C stop taking connections,
finish the requests in flight, then exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blip.devices import add_device_flag, resolve_device
from blip.serve.indexes import IndexSpec, check_index_folder, parse_indexes, split_name
from blip.serve.settings import DEFAULT_MAX_BATCH, MIB, ServeSettings

if TYPE_CHECKING:
    from blip.api import Blip

_logger = logging.getLogger(__name__)

LOG_BURST = 10  # the same message at most this often per LOG_WINDOW_S, then dropped (and counted)
LOG_WINDOW_S = 60.0


class StartError(Exception):
    """The server cannot start: one line for the user, exit 2."""


class RepeatFilter(logging.Filter):
    """Let a message (logger, level and unformatted text) through at most `burst` times per `window_s`; the first
    one let through after drops says how many were dropped. Keeps a flood (e.g. asyncio's accept() errors when out
    of file descriptors, or invalid-request warnings) from filling the disk."""

    def __init__(self, burst: int = LOG_BURST, window_s: float = LOG_WINDOW_S, max_keys: int = 1024):
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [window start, count, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg)[:200])
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)
            if state is None or now - state[0] > self.window_s:
                dropped = int(state[2]) if state else 0
                if len(self._seen) >= self.max_keys:
                    self._seen.clear()
                self._seen[key] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this dropped in the last {self.window_s:g} s]"
                return True
            state[1] += 1
            if state[1] > self.burst:
                state[2] += 1
                return False
            return True


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


@dataclass(frozen=True)
class SettingFlag:
    """A flag that sets one `ServeSettings` field: its type and default are the field's (in `unit`s: MiB flags)."""

    flag: str
    field: str
    help: str | None = None
    unit: int = 1

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def value(self, args: argparse.Namespace) -> Any:
        given = getattr(args, self.dest)
        return given if self.unit == 1 else int(given * self.unit)


BATCHING_FLAGS = (
    SettingFlag("--max-batch", "max_batch", "rows merged into one model call (default: 16 on a CPU, 64 on a GPU)"),
    SettingFlag("--max-wait-ms", "max_wait_ms", "wait for a batch to fill"),
)
LIMIT_FLAGS = (
    SettingFlag("--queue-size", "queue_size", "requests admitted at once; 503 past"),
    SettingFlag("--timeout", "timeout_s", "seconds per request (503 past)"),
    SettingFlag("--max-connections", "max_connections", "requests in progress at once; 503 past"),
    SettingFlag(
        "--max-open-connections",
        "max_open_connections",
        "TCP connections open at once (kept under the open-file limit); past it new ones get 503 and are closed",
    ),
    SettingFlag(
        "--header-timeout",
        "header_timeout_s",
        "seconds a connection has to send a complete request head; closed past it",
    ),
    SettingFlag("--keep-alive-timeout", "keep_alive_timeout_s", "seconds an idle keep-alive connection stays open"),
    SettingFlag("--max-body-mb", "max_body_bytes", unit=MIB),
    SettingFlag("--max-json-depth", "max_json_depth", "nesting of a JSON body"),
    SettingFlag("--max-json-items", "max_json_items", "values (elements, members) in a JSON body"),
    SettingFlag("--max-image-pixels", "max_image_pixels", "decoded pixels per image"),
    SettingFlag(
        "--max-request-pixels", "max_request_pixels", "decoded pixels of a request's images in all; 413 past it"
    ),
    SettingFlag(
        "--max-inflight-pixels",
        "max_inflight_pixels",
        "pixels being decoded at once, server-wide; later images wait (503 at the request timeout)",
    ),
    SettingFlag("--decode-workers", "decode_workers", "images decoded at once, in worker threads"),
    SettingFlag("--max-images", "max_images", "images per request"),
    SettingFlag("--max-texts", "max_texts", "questions or texts per request"),
    SettingFlag("--max-new-tokens", "max_new_tokens", "cap on max_new_tokens"),
    SettingFlag("--max-beams", "max_beams", "cap on num_beams"),
    SettingFlag("--max-top-k", "max_top_k", "cap on /v1/retrieve top_k"),
    SettingFlag("--fetch-timeout", "fetch_total_timeout_s", "seconds per URL"),
    SettingFlag("--fetch-max-mb", "fetch_max_bytes", "bytes per image", unit=MIB),
    SettingFlag("--max-redirects", "fetch_max_redirects"),
)


def _add_setting_flags(parser: argparse.ArgumentParser, flags: tuple[SettingFlag, ...]) -> None:
    defaults = ServeSettings()
    for flag in flags:
        default = getattr(defaults, flag.field)
        kind = (int if default is None else type(default)) if flag.unit == 1 else float  # None: max_batch's default
        parser.add_argument(
            flag.flag, type=kind, default=default if flag.unit == 1 else default / flag.unit, help=flag.help
        )


def build_parser() -> argparse.ArgumentParser:
    defaults = ServeSettings()
    p = argparse.ArgumentParser(
        prog="blip serve",
        description="Serve BLIP and BLIP-2 models over HTTP: Azure ML /score, the model card's POST / and /predict, "
        "/v1/caption|vqa|match|similarity|embed|retrieve, /healthz, /readyz, /metrics and a web page at /.",
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
    add_device_flag(p)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument(
        "--batch-size", type=int, help="images per forward pass inside a batch (default: --max-batch's, 16 on a CPU)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_setting_flags(p, BATCHING_FLAGS)
    p.add_argument("--no-batching", action="store_true", help="one request per model call (same as --max-batch 1)")
    _add_setting_flags(p, LIMIT_FLAGS)
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_models(specs: list[str]) -> dict[str, str]:
    """["caption=path", "path2"] -> {"caption": "path", "<name of path2>": "path2"}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, path = split_name(spec)
        name = name or Path(spec.rstrip("/")).name or spec
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
    values = {flag.field: flag.value(args) for flag in (*BATCHING_FLAGS, *LIMIT_FLAGS)}
    if args.no_batching:
        values.update(max_batch=1, max_wait_ms=0.0)
    return ServeSettings(
        host=args.host, port=args.port, token=token or None, cors_origins=tuple(args.cors_origin), **values
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 500 else text[:500] + "..."


def forward_batch(args: argparse.Namespace, device: str) -> int:
    """Images per forward pass: --batch-size, else as many as a micro-batch merges on this device."""
    if args.batch_size is not None:
        return args.batch_size
    return ServeSettings(max_batch=args.max_batch).batch_rows(device) if not args.no_batching else DEFAULT_MAX_BATCH


def load_models(paths: dict[str, str], args: argparse.Namespace, device: str) -> dict[str, Blip]:
    import blip

    models = {}
    for name, path in paths.items():
        start = time.perf_counter()
        try:
            models[name] = blip.load(
                path, device=device, dtype=args.dtype, tokenizer=args.tokenizer, batch_size=forward_batch(args, device)
            )
        except Exception as e:  # any failure to load is the user's to fix: one line, no traceback
            raise StartError(f"--model {name}={path}: cannot load it: {type(e).__name__}: {_one_line(e)}") from e
        _logger.info("loaded %s from %s in %.1f s", name, path, time.perf_counter() - start)
    _logger.info("models loaded: %s", ", ".join(f"{n} ({sorted(m.tasks)})" for n, m in models.items()))
    return models


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: uvicorn does that) before the models load, so a port in use
    is a one-line start error at once."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP proto: asyncio sets TCP_NODELAY
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
    except OSError as e:
        raise StartError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def uvicorn_config(app: Any, settings: ServeSettings, **overrides: Any) -> Any:
    """uvicorn's config for `app`: our access log and JSON logs, the connection guard (head timeout, cap on open
    connections) and the keep-alive timeout from `settings`."""
    import uvicorn

    from blip.serve.connections import connection_cap, guarded_protocol

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": int(settings.timeout_s) + 5,
        "server_header": False,
        "http": guarded_protocol(settings.header_timeout_s, connection_cap(settings.max_open_connections)),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def configure_logging(level: str) -> logging.Handler:
    """JSON lines on stderr; returns the handler (installed on the root logger)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware writes the access log
    return handler


class StartupLog:
    """Holds the log records of the start (model loading, ...) until it succeeds, so that a failed start says one
    line; at debug level they go out at once."""

    def __init__(self, handler: logging.Handler, level: str):
        self.handler = handler
        self.buffer: logging.handlers.MemoryHandler | None = None
        if level != "debug":
            self.buffer = logging.handlers.MemoryHandler(1 << 20, logging.CRITICAL + 1, handler, flushOnClose=False)
            logging.getLogger().handlers[:] = [self.buffer]

    def started(self) -> None:
        if self.buffer is not None:
            self.buffer.flush()
            logging.getLogger().handlers[:] = [self.handler]
            self.buffer.close()

    def failed(self) -> None:
        if self.buffer is not None:
            logging.getLogger().handlers[:] = [self.handler]
            self.buffer.setTarget(None)  # type: ignore[arg-type]
            self.buffer.close()


def cli_main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM/SIGINT. Returns 0 after a clean stop, 2 on bad usage or a failed start (one
    line on stderr, nothing bound), 1 if the server stopped for another reason."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code or 0)
    try:
        device = str(resolve_device(args.device))  # an unusable device: one line, before binding or loading
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

    startup_log = StartupLog(configure_logging(args.log_level), args.log_level)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sock = None
    try:
        sock = bind_socket(settings.host, settings.port)  # bound, not listening: a port in use fails before loading
        models = load_models(paths, args, device)
        try:
            app = create_app(models, settings, indexes=dict(indexes))
        except ValueError as e:  # IndexSetupError: an index that does not fit the served models
            raise StartError(_one_line(e)) from e
    except StartError as e:
        if sock is not None:
            sock.close()
        startup_log.failed()
        print(f"blip serve: error: {e}", file=sys.stderr)
        return 2
    startup_log.started()
    server = uvicorn.Server(uvicorn_config(app, settings))
    served = ", ".join([*paths, *(f"index {n}" for n in indexes)])
    _logger.info("serving %s on http://%s:%d", served, settings.host, sock.getsockname()[1])
    _quiet_after_shutdown()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0 if server.started else 1


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
