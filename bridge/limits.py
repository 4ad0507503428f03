"""Pure: bounds on caller-controlled JSON (``docs/API.md``, "Limits"), used by the API
(:mod:`bridge.api_limits`) and the job parser (:mod:`bridge.jobs`).

Python's ``json`` recurses once per nesting level and raises ``RecursionError`` on deep input;
:func:`json_depth` measures nesting without recursing, so deep input is refused by name first.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

#: Deepest JSON nesting a request or queued job may have (the deepest legitimate body, a job's
#: ``metadata``, is a few levels).
MAX_JSON_DEPTH = 64
#: Largest queued job payload (bytes) the worker parses; a larger one is dead-lettered.
MAX_PAYLOAD_BYTES = 1_048_576

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(body: bytes | str) -> int:
    """How deep ``body``'s arrays and objects nest (brackets inside strings do not count); a body
    with at most :data:`MAX_JSON_DEPTH` brackets gets their count (a bound, found cheaply). Linear
    and iterative: safe on input that would make a recursive parser overflow."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    if data.count(b"[") + data.count(b"{") <= MAX_JSON_DEPTH:
        return data.count(b"[") + data.count(b"{")  # an upper bound, cheap: cannot be too deep
    depth = deepest = 0
    for byte in _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS):
        if byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):  # JSON true/false: pydantic's lax mode would read them as 1/0
        raise ValueError("a whole number is expected, not true or false")
    return value


#: An integer field of a request: ``true``/``false`` are refused, as the OpenAPI document's
#: ``integer`` says (docs/API.md, "Limits"); everything else is pydantic's ``int``.
WholeNumber = Annotated[int, BeforeValidator(_not_a_bool)]
