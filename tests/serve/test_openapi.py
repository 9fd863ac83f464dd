"""The OpenAPI document is a contract: `openapi.json` here is the document the server published before its routes were
split into modules (paths, operation ids, tags, summaries, request and response schemas, error responses), and the
app must keep producing exactly it. After a deliberate API change, regenerate it with
`python tests/serve/test_openapi.py` and review the diff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

from blip.serve import create_app  # noqa: E402

STORED = Path(__file__).with_name("openapi.json")


def current() -> dict[str, Any]:
    """The app's document as JSON would carry it (tuples as lists, keys as strings), in the app's own order."""
    return json.loads(json.dumps(create_app(loader=dict).openapi()))


def docs_page(doc: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """What /docs shows, in its order: each tag (first seen first) with its operations as "METHOD /path"."""
    groups: dict[str, list[str]] = {}
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            for tag in operation.get("tags", ["default"]):
                groups.setdefault(tag, []).append(f"{method.upper()} {path}")
    return list(groups.items())


def test_the_openapi_document_is_unchanged():
    stored = json.loads(STORED.read_text())
    doc = current()
    assert sorted(doc["paths"]) == sorted(stored["paths"])
    for path, methods in stored["paths"].items():
        for method, operation in methods.items():
            assert doc["paths"][path][method] == operation, f"{method.upper()} {path}"
    assert doc["components"] == stored["components"]
    assert doc == stored  # and everything else (info, openapi version); dict equality ignores key order


def test_the_docs_page_lists_the_same_operations_in_the_same_order():
    assert docs_page(current()) == docs_page(json.loads(STORED.read_text()))


if __name__ == "__main__":
    STORED.write_text(json.dumps(current(), indent=1, ensure_ascii=False) + "\n")
