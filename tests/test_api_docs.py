"""The OpenAPI document and the interactive docs (docs/API.md, "OpenAPI"), through the real stack:
the document lists exactly the app's routes, sits behind the key like the rest, turns off with
``API_DOCS=0``; and schemathesis fuzzes the API from it (valid and malformed input) against an
API-only bridge over the session's tritonserver and a real Redis: no answer is a 5xx, malformed
input is refused with a 4xx, and every answer matches the document.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hypothesis
import hypothesis.errors
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, response_schema_conformance

from bridge.api_docs import DOCS_URL, OPENAPI_URL, REDOC_URL
from tests.stack import API_KEY, api_routes, client, running

#: Routes kept out of the document on purpose: the operator page's files (HTML, script, style,
#: result thumbnails; tests/test_ui.py) and the docs themselves.
UNDOCUMENTED = {("/ui", "GET"), ("/ui/", "GET"), ("/ui/static/{name}", "GET"), ("/ui/files/{path:path}", "GET")}
#: Not fuzzed: the event streams run until a job ends or the server stops (a request would not
#: return); loads and unloads change what the shared tritonserver holds for the tests after this one.
NOT_FUZZED = {("/ui/events", "GET"), ("/memory/load", "POST"), ("/memory/unload", "POST"),
              ("/emergency/operation", "POST"), ("/ui/memory/{action}", "POST")}
#: Examples per operation and mode: the whole run stays well under 30 s on the 2-core machine.
EXAMPLES = 3


def _documented(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, operations in document["paths"].items() for method in operations}


async def test_the_document_lists_every_route_and_is_behind_the_key(settings_for) -> None:
    async with running(settings_for(), jobs=False) as runtime, client(runtime) as http:
        app = runtime.api_server.config.app
        response = await http.get(OPENAPI_URL)
        assert response.status_code == 200, response.text
        document = response.json()
        served = {(path, method) for path, methods in api_routes(app) for method in methods}
        docs = {(url, "GET") for url in (OPENAPI_URL, DOCS_URL, REDOC_URL, "/docs/oauth2-redirect")}
        assert UNDOCUMENTED <= served
        assert _documented(document) == served - UNDOCUMENTED - docs
        assert document["components"]["securitySchemes"]["bearerKey"]["scheme"] == "bearer"
        assert document["paths"]["/health"]["get"]["security"] == []
        assert "HTTPValidationError" not in document["components"]["schemas"]  # the app's own error shapes instead
        for url in (DOCS_URL, REDOC_URL):
            page = await http.get(url)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        async with client(runtime, key=None) as anonymous:
            for url in (OPENAPI_URL, DOCS_URL, REDOC_URL):
                assert (await anonymous.get(url)).status_code == 401


async def test_api_docs_0_turns_the_docs_off(settings_for) -> None:
    async with running(settings_for(api_docs=False), jobs=False) as runtime, client(runtime) as http:
        for url in (OPENAPI_URL, DOCS_URL, REDOC_URL):
            assert (await http.get(url)).status_code == 404
        assert (await http.get("/worker/info")).status_code == 200


def _not_a_server_error(ctx: Any, response: Any, case: Any) -> None:
    """No 5xx but 503, which says "not now" (a model or the CPU pool busy, Triton or Redis slow to
    answer a probe: docs/API.md, "Errors") and which a loaded 2-core machine can cause; how many
    503s there were is checked after the run."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{case.operation.label} answered {response.status_code}: {response.text[:500]}")


def _fuzz(document: dict[str, Any], base_url: str) -> list[int]:
    """Every documented operation but :data:`NOT_FUZZED`, :data:`EXAMPLES` valid and as many
    malformed requests each; returns the status of every answer."""
    schema = schemathesis.openapi.from_dict(document)
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.path, operation.method.upper()) in NOT_FUZZED:
            continue
        for mode, checks in ((GenerationMode.POSITIVE, [_not_a_server_error, response_schema_conformance]),
                             (GenerationMode.NEGATIVE, [_not_a_server_error, negative_data_rejection,
                                                        response_schema_conformance])):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                                 derandomize=True,  # the same examples on every run: CI does not flip
                                 suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                response = case.call(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
                statuses.append(response.status_code)
                case.validate_response(response, checks=checks)

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # Only a route that takes no input at all has no malformed form.
                assert mode is GenerationMode.NEGATIVE and not list(operation.iter_parameters()) \
                    and not list(operation.body), operation.label
    return statuses


async def test_schemathesis_finds_no_server_error_and_no_answer_off_the_document(settings_for) -> None:
    # /enhance/legacy falls back to the prompt after ENHANCE_TIMEOUT_S: a short one keeps the run short.
    async with running(settings_for(enhance_timeout_s=1.0), jobs=False) as runtime, client(runtime) as http:
        document = (await http.get(OPENAPI_URL)).json()
        # schemathesis calls with requests (blocking): from a thread, while this loop serves them.
        statuses = await asyncio.to_thread(_fuzz, document, f"http://127.0.0.1:{runtime.api_port}")
        assert len(statuses) >= len(_documented(document) - NOT_FUZZED) * 2
        assert statuses.count(503) <= len(statuses) // 10, statuses  # "not now" stays the exception


async def test_true_or_false_is_not_a_number(settings_for) -> None:
    """JSON booleans where the document says integer are refused (pydantic's lax mode read them as
    1/0: schemathesis found ``"index": true`` accepted by ``POST /admin``)."""
    async with running(settings_for(), jobs=False) as runtime, client(runtime) as http:
        admin = await http.post("/admin", json={"action": "dead_letters", "index": True})
        assert admin.status_code == 422 and "index" in admin.text, admin.text
        chat = await http.post("/v1/chat/completions", json={
            "model": "qwen_instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": True})
        assert chat.status_code in (400, 422) and "max_tokens" in chat.text, chat.text
        fine = await http.post("/admin", json={"action": "dead_letters", "limit": 5})
        assert fine.status_code == 200, fine.text
