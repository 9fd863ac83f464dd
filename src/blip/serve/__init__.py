"""`blip serve`: an HTTP endpoint for loaded BLIP models (needs the `serve` extra: fastapi, uvicorn, httpx).

    from blip.serve import create_app, ServeSettings
    app = create_app({"caption": blip.load(...)}, ServeSettings(max_batch=16))

    app = create_app(models, indexes={"photos": "photos-embedded/"})  # `blip batch embed` output: POST /v1/retrieve

Modules: app (assembly), routes/ (ops, v1, azure, card: a module per API, over the one service), service (models,
batcher, checks, model calls), schemas (bodies), errors (the one error shape), batching (micro-batcher), inputs (images
from requests; URLs through `blip.fetch`), indexes (collection indexes and their models), middleware (limits, auth,
metrics, access log), connections (head timeout, connection cap), metrics, settings, cli.
"""

from __future__ import annotations

from typing import Any

from blip.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":  # imported on use, so `import blip.serve` works without fastapi installed
        from blip.serve.app import create_app

        return create_app
    raise AttributeError(name)
