"""bridge/runtime.py: what the process does when its shutdown does not end."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

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
