"""The server's shape: `blip.serve.app` assembles, each API's routes live in their own module of `blip.serve.routes`,
and those routers (module-level, shared by every app in the process) reach each app's own service and settings."""

from __future__ import annotations

import ast
import inspect

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from blip.serve import ServeSettings, create_app, routes  # noqa: E402
from blip.serve import app as app_module  # noqa: E402

MODULE_OF_TAG = {"service": "ops", "blip": "v1", "explain": "explain", "Azure ML": "azure", "model card": "card"}
MODULE_OF_TAG.update({"Hugging Face Inference": "hf", "OpenAI": "openai"})


def test_each_api_is_served_by_its_route_module():
    served = {
        (method, route.path): route.endpoint.__module__ for route in routes.api_routes() for method in route.methods
    }
    operations = {
        (method.upper(), path): operation["tags"][0]
        for path, methods in create_app(loader=dict).openapi()["paths"].items()
        for method, operation in methods.items()
    }
    assert set(served) == set(operations)  # every operation comes from a router, none from the app itself
    for operation, tag in operations.items():
        assert served[operation] == f"blip.serve.routes.{MODULE_OF_TAG[tag]}", operation


def test_the_app_module_only_assembles():
    """No route is declared in app.py (no route decorator, no add_api_route), and create_app stays short."""
    tree = ast.parse(inspect.getsource(app_module))
    functions = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
    decorators = [
        d.func.attr
        for f in functions
        for d in f.decorator_list
        if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
    ]
    assert set(decorators) <= {"exception_handler"}
    assert "add_api_route" not in {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert len(inspect.getsource(app_module.create_app).splitlines()) < 40


def test_apps_share_the_routers_but_each_uses_its_own_service_and_settings():
    strict = create_app({}, ServeSettings(token="secret", max_json_depth=2))
    plain = create_app({}, ServeSettings())
    deep = b'{"images": [[[{"b64": "x"}]]]}'
    headers = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
    with TestClient(strict) as s, TestClient(plain) as p:
        assert s.get("/v1/models").status_code == 401
        assert p.get("/v1/models").json() == {"models": [], "object": "list", "data": []}
        too_deep = s.post("/v1/caption", content=deep, headers=headers)
        assert too_deep.status_code == 413 and "nests deeper than 2" in too_deep.json()["error"]["message"]
        assert p.post("/v1/caption", content=deep, headers=headers).status_code == 422  # parsed, then invalid
        assert s.get("/healthz").json()["status"] == p.get("/healthz").json()["status"] == "ok"
    assert strict.state.service is not plain.state.service
