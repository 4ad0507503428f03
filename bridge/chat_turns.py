"""Counting chat and completion requests by route and outcome (``gpu_worker_chat_turns_total``,
docs/DEPLOY.md "Chat metrics"). A decorator on the route handlers of bridge/api_chat.py: an answer
is counted when the handler returns or raises, a stream when it ends."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bridge import metrics
from bridge.api_common import ApiError, EventStream


def outcome_of(status: int) -> str:
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    return "bad_request" if 400 <= status < 500 else "error"


def counted(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Count each request the handler (which takes ``request``) serves; FastAPI reads the
    handler's own signature through ``functools.wraps``."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        route = kwargs["request"].url.path
        try:
            result = await handler(*args, **kwargs)
        except ApiError as exc:
            metrics.inc_chat_turn(route, outcome_of(exc.status))
            raise
        except Exception:
            metrics.inc_chat_turn(route, "error")
            raise
        if isinstance(result, EventStream):
            result.body_iterator = _watched(result.body_iterator, route)
        else:
            metrics.inc_chat_turn(route, "ok")
        return result

    return wrapper


async def _watched(events: AsyncIterator[Any], route: str) -> AsyncIterator[Any]:
    """Pass a stream's events through; count it when it ends: ``error`` if it sent an error event,
    ``cancelled`` if the client left first, else ``ok``."""
    outcome = "cancelled"
    try:
        async for event in events:
            if isinstance(event, str) and event.startswith('data: {"error"'):
                outcome = "error"
            yield event
        if outcome != "error":
            outcome = "ok"
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception:
        outcome = "error"
        raise
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
        metrics.inc_chat_turn(route, outcome)
