"""bridge/runtime.py and bridge/aio.py: what the process does when its shutdown does not end."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path

from bridge.aio import RECANCEL_S, cancel_until_done

REPO = Path(__file__).resolve().parent.parent

# A process whose shutdown waits on something that never comes, in a task and in a thread.
STUCK = """
import asyncio, logging, sys, threading
from bridge import runtime
from bridge.settings import Settings

runtime.SHUTDOWN_SLACK_S = 1.5
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s")
never = threading.Event()

async def wait_for_a_reply_that_never_comes():
    await asyncio.Event().wait()

async def main():
    runtime._arm_shutdown_watchdog(Settings(shutdown_grace_s=0.5, triton_exit_timeout_s=0))
    threading.Thread(target=never.wait, name="stuck-thread").start()
    await asyncio.create_task(wait_for_a_reply_that_never_comes(), name="stuck-task")

asyncio.run(main())
"""


def test_a_shutdown_that_hangs_logs_what_it_waits_on_and_exits() -> None:
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", STUCK], cwd=REPO, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert 2.0 <= took < 30, took  # grace 0.5 + exit timeout 0 + slack 1.5, plus the interpreter's start
    # The asyncio side: which task waits, and on what (a code location, not a value).
    assert "ERROR shutdown has not finished after 1 s; pending asyncio tasks" in result.stdout, result.stdout
    assert "stuck-task" in result.stdout and "wait_for_a_reply_that_never_comes" in result.stdout, result.stdout
    # The threads' side, from faulthandler, which then ends the process.
    assert "Timeout (0:00:02)!" in result.stderr, result.stderr
    assert result.stderr.count("File ") >= 2 and "threading.py" in result.stderr, result.stderr


async def test_a_task_that_loses_its_cancel_is_cancelled_again_and_the_stop_ends(caplog) -> None:
    """A loop that swallows its first cancel (as a library call did to the heartbeat loop) is
    cancelled again after ``RECANCEL_S``; the stop ends, logs the task's name, and a task that
    ended on its own with an error does not fail it."""
    swallowed = []

    async def loses_one_cancel() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(time.monotonic())  # as if a callee had caught it

    async def fails() -> None:
        raise RuntimeError("ended badly before the stop")

    deaf = asyncio.create_task(loses_one_cancel(), name="heartbeat")
    broken = asyncio.create_task(fails(), name="broken")
    quiet = asyncio.create_task(asyncio.sleep(3600), name="sleeper")
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="bridge.aio"):
        await asyncio.wait_for(cancel_until_done([deaf, broken, quiet]), 10)
    assert deaf.cancelled() and quiet.cancelled() and isinstance(broken.exception(), RuntimeError)
    assert len(swallowed) == 1 and RECANCEL_S <= time.monotonic() - started < RECANCEL_S + 2
    assert [r.getMessage() for r in caplog.records] == [
        f"still running {RECANCEL_S:.0f}s after their cancel, cancelled again: ['heartbeat']"]
