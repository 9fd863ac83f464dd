"""Server settings: limits, batching and security knobs in one frozen dataclass (the CLI fills it from flags)."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024
DEFAULT_MAX_BATCH = 16  # rows per model call on a CPU: past it a batch only adds latency
CUDA_MAX_BATCH = 64  # on a GPU a decode step costs about the same for 1 or 64 rows: fill it


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token / secret_token; None: no auth
    cors_origins: tuple[str, ...] = ()  # empty: CORS off

    # dynamic micro-batching
    max_batch: int | None = None  # rows (images, questions, pairs) merged into one model call; 1 turns batching off;
    # None: DEFAULT_MAX_BATCH on a CPU, CUDA_MAX_BATCH on a GPU (`batch_rows`)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    queue_size: int = 64  # requests admitted at once (fetching, decoding, queued, running); more get 503
    timeout_s: float = 30.0  # per request, from admission to answer
    retry_after_s: int = 1
    max_connections: int = 256  # HTTP requests in progress at once (health and metrics routes exempt)
    decode_workers: int = 4  # images decoded at once

    # connections (slow or idle clients); the cap on open connections stays under the open-file limit
    max_open_connections: int = 1024  # TCP connections open at once; past it new ones get 503 and are closed
    header_timeout_s: float = 10.0  # a connection must send a complete request head within this
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this

    # request limits
    max_body_bytes: int = 32 * MIB
    max_images: int = 16  # per request
    max_texts: int = 64  # questions or texts per request, in all
    max_text_chars: int = 1000
    max_answers: int = 1000  # VQA rank-mode candidate answers
    max_image_pixels: int = 25_000_000
    max_request_pixels: int = 100_000_000  # decoded pixels of a request's images, in all (413 past it)
    max_inflight_pixels: int = 50_000_000  # decoded pixels being decoded at once, server-wide (later images wait)
    max_json_depth: int = 32  # nesting of a JSON body
    max_json_items: int = 10_000  # values (array elements, object members) in a JSON body
    max_new_tokens: int = 64
    max_beams: int = 8
    max_captions: int = 8
    max_top_k: int = 100  # /v1/retrieve results per query (each re-ranked one costs an ITM pass)

    # URL fetching
    fetch_max_bytes: int = 16 * MIB
    fetch_max_redirects: int = 3
    fetch_connect_timeout_s: float = 5.0
    fetch_read_timeout_s: float = 10.0
    fetch_total_timeout_s: float = 20.0
    fetch_allow_loopback: bool = False  # tests only: lets a local test server stand in for the internet

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        positive = (
            "queue_size",
            "max_connections",
            "decode_workers",
            "max_body_bytes",
            "max_images",
            "max_texts",
            "max_text_chars",
            "max_answers",
            "max_image_pixels",
            "max_request_pixels",
            "max_inflight_pixels",
            "max_open_connections",
            "max_json_depth",
            "max_json_items",
            "max_new_tokens",
            "max_beams",
            "max_captions",
            "max_top_k",
            "fetch_max_bytes",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        timeouts = ("timeout_s", "header_timeout_s", "keep_alive_timeout_s")
        for name in (*timeouts, "fetch_connect_timeout_s", "fetch_read_timeout_s", "fetch_total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_inflight_pixels < self.max_image_pixels:  # else an image under the cap could never be decoded
            pixels = f"max_inflight_pixels ({self.max_inflight_pixels})"
            raise ValueError(f"{pixels} must be >= max_image_pixels ({self.max_image_pixels})")
        if self.max_wait_ms < 0 or self.fetch_max_redirects < 0:
            raise ValueError("max_wait_ms and fetch_max_redirects must be >= 0")

    def batch_rows(self, device: object = "cpu") -> int:
        """Rows merged into one model call on `device` (a torch.device or its name): `max_batch` when set."""
        if self.max_batch is not None:
            return self.max_batch
        return CUDA_MAX_BATCH if str(device).startswith("cuda") else DEFAULT_MAX_BATCH
