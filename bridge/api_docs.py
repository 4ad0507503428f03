"""The OpenAPI document of the HTTP API, and its interactive docs (docs/API.md, "OpenAPI").

FastAPI writes the document from the routes; this adds what it cannot know: the bearer key
(:mod:`bridge.api_auth`; ``/health``, ``/ready``, the operator page's login need none, and
``API_OPEN_ROUTES`` take it or none), and the error bodies the app really
answers (:mod:`bridge.api_common`: the old contract's routes ``{"success": false, "error"}``, 400 for
bad input; the others ``{"error": {message, type, param}}``, 422), in place of FastAPI's default
validation-error shape that this app never sends. Every status a route may answer with an error
(4XX, 5XX) is documented with that body, so a client (and tests/test_api_docs.py's schemathesis
run) can check any answer against the document.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from bridge.api_auth import PUBLIC_PATHS
from bridge.api_common import LEGACY_PATHS
from bridge.api_ui import PUBLIC as UI_PUBLIC_PATHS

#: Where the document and the interactive docs are served (FastAPI's usual routes).
OPENAPI_URL, DOCS_URL, REDOC_URL = "/openapi.json", "/docs", "/redoc"

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string"},
            "param": {"type": ["string", "null"]},
            "fields": {"type": "array", "items": {
                "type": "object", "properties": {"field": {"type": "string"}, "message": {"type": "string"}}}},
        },
    }},
}
_LEGACY_ERROR = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {"success": {"const": False}, "error": {"type": "string"}},
}


def docs_urls(enabled: bool) -> dict[str, str | None]:
    """``FastAPI(...)`` arguments: the usual routes, or none (``API_DOCS=0``)."""
    if not enabled:
        return {"openapi_url": None, "docs_url": None, "redoc_url": None}
    return {"openapi_url": OPENAPI_URL, "docs_url": DOCS_URL, "redoc_url": REDOC_URL}


def install_openapi(app: FastAPI, open_routes: Iterable[str] = ()) -> None:
    """Make ``app.openapi()`` (what ``/openapi.json`` serves) the document described above;
    ``open_routes`` (``API_OPEN_ROUTES``) take the key or none."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, description=app.description,
                                   routes=app.routes)
            app.openapi_schema = _with_keys_and_errors(document, frozenset(open_routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend it


def _with_keys_and_errors(document: dict[str, Any], open_routes: frozenset[str]) -> dict[str, Any]:
    components = document.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearerKey"] = {
        "type": "http", "scheme": "bearer", "description": "One of the keys of WORKER_API_KEY."}
    schemas = components.setdefault("schemas", {})
    schemas["Error"], schemas["LegacyError"] = _ERROR, _LEGACY_ERROR
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's shape; never answered here
        schemas.pop(name, None)
    document["security"] = [{"bearerKey": []}]
    for path, operations in document.get("paths", {}).items():
        body = {"$ref": "#/components/schemas/" + ("LegacyError" if path in LEGACY_PATHS else "Error")}
        for operation in operations.values():
            if path in PUBLIC_PATHS or path in UI_PUBLIC_PATHS:
                operation["security"] = []
            elif path in open_routes:
                operation["security"] = [{"bearerKey": []}, {}]
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, what in (("4XX", "The request is refused; the message says why."),
                                 ("5XX", "The worker cannot serve it now; the message says why.")):
                responses[status] = {"description": what, "content": {"application/json": {"schema": body}}}
    return document
