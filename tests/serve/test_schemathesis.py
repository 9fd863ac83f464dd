"""Property-based tests generated from the served OpenAPI schema (schemathesis, over real HTTP on 127.0.0.1): for
every operation, generated requests, valid and invalid, never get a 5xx, and every answer matches the documented
status codes, content types and response schemas."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import (  # noqa: E402
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from blip.serve import create_app  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}


def operation_labels() -> list[str]:
    """ "METHOD /path" of every operation, read off the app's schema (no server or model needed)."""
    spec = create_app(loader=dict).openapi()
    return [f"{method.upper()} {path}" for path, methods in spec["paths"].items() for method in methods]


@pytest.fixture(scope="module", params=["blip", "blip2"])
def api_schema(request):
    """blip: the tiny models and a collection index, so /v1/retrieve's examples reach the model too; blip2: the tiny
    BLIP-2 models first (requests naming no model reach them), BLIP's after."""
    live = request.getfixturevalue("retrieval_server" if request.param == "blip" else "blip2_server")
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json")


@pytest.mark.schemathesis
@pytest.mark.parametrize("label", operation_labels())
def test_generated_requests_never_get_a_server_error(api_schema, label):
    operation = api_schema.find_operation_by_label(label)
    assert operation is not None, f"{label} is not in the served schema"
    for strategy in operation.get_strategies_from_examples():  # the schema's own examples reach the models

        @given(case=strategy)
        @settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def example(case):
            response = case.call_and_validate(checks=CHECKS, timeout=30)
            assert response.status_code == 200, response.text

        example()
    for mode, examples in EXAMPLES.items():

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=30)

        try:
            check()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise  # only an operation without inputs has no invalid requests to generate
