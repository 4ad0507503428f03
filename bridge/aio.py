"""Pure asyncio helpers the bridge's parts share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

#: How long a cancelled task gets to end before it is cancelled again.
RECANCEL_S = 1.0


async def cancel_until_done(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again those still running after
    :data:`RECANCEL_S`: a cancellation can be lost inside a library call (seen: the heartbeat loop,
    ``Queue.keep_alive``, went back to its sleep with its cancel swallowed somewhere in a Redis
    call, on Python 3.11, and a shutdown then waited for it for ever). A loop of ours that must end
    does not catch ``CancelledError``, so the second cancel ends it. Their exceptions are
    retrieved, not raised."""
    tasks = list(tasks)
    pending = [task for task in tasks if not task.done()]
    while pending:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=RECANCEL_S)
        if still:
            log.warning("still running %.0fs after their cancel, cancelled again: %s", RECANCEL_S,
                        sorted(task.get_name() for task in still))
        pending = list(still)
    await asyncio.gather(*tasks, return_exceptions=True)

