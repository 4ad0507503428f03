"""The operator's page (``GET /ui``) in a real headless Chromium, driven by Playwright, against
the real bridge: the session tritonserver on tiny models, a real redis-server, the worker loop.

Chromium is Debian's (``/usr/bin/chromium``; ``.ci/run`` installs it); Playwright's own browser
download is not used. The tests skip, saying why, when either is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.stack import API_KEY, client

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The README's picture of the page; rewritten only when asked (UPDATE_SCREENSHOT=1), so that a test
# run does not change a tracked file. Otherwise it goes to the test's own folder.
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "operator-page.png"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed "
                                "(apt-get install chromium; .ci/run does)")


@pytest.fixture(scope="module")
async def browser():
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        await browser.close()


@pytest.fixture()
async def page(browser, stack):
    """A fresh browser context (no cookies) on the stack's API; every URL it requested in ``page.urls``."""
    context = await browser.new_context(base_url=f"http://127.0.0.1:{stack.api_port}", viewport={"width": 1360, "height": 1000})
    page = await context.new_page()
    page.urls = []
    page.on("request", lambda request: page.urls.append(request.url))
    yield page
    await context.close()


async def login(page) -> None:
    await page.goto("/ui")
    await page.fill("#key", API_KEY)
    await page.click("#login button[type=submit]")
    await page.wait_for_selector("#dashboard", state="visible")
    await page.wait_for_selector("#models tr[data-model=sdxl]")  # the first snapshot arrived


async def submit(page, job_type: str, steps: int, frames: int | None = None, size: int = 64) -> str:
    await page.select_option("#job-type", job_type)
    await page.fill("#prompt", "a lighthouse on a cliff at dawn")
    await page.fill("#width", str(size))
    await page.fill("#height", str(size))
    await page.fill("#steps", str(steps))
    await page.fill("#frames", "" if frames is None else str(frames))
    await page.click("#submit button[type=submit]")
    await page.wait_for_function("() => document.querySelector('#submit-result').dataset.jobId")
    return await page.eval_on_selector("#submit-result", "e => e.dataset.jobId")


async def test_without_a_key_the_page_asks_for_one_and_shows_nothing(page, stack):
    await page.goto("/ui")
    await page.wait_for_selector("#login-panel", state="visible")
    assert await page.is_hidden("#dashboard")
    body = await page.inner_text("body")
    assert stack.settings.worker_id not in body and "sdxl_queue" not in body
    assert await page.locator("#running tbody tr, #finished tbody tr, #models tbody tr").count() == 0

    # A wrong key is refused and leaves the page as it was; the data routes refuse the browser.
    await page.fill("#key", "not-the-key")
    await page.click("#login button[type=submit]")
    await page.wait_for_function("() => document.querySelector('#login-error').textContent.includes('invalid')")
    assert await page.is_hidden("#dashboard")
    for path in ("/ui/events", "/ui/memory/load?which=sdxl"):
        response = await (page.request.get(path) if path.endswith("events") else page.request.post(path))
        assert response.status == 401, path
    assert await page.context.cookies() == []


async def test_a_submitted_job_runs_on_the_page_and_a_wan_job_is_cancelled_from_it(page, stack, tmp_path):
    await login(page)
    cookies = await page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [("bridge_ui_session", True, "Strict")]
    assert API_KEY not in cookies[0]["value"]
    assert await page.evaluate("document.cookie") == ""  # the script cannot read it

    # A tiny SDXL job: it appears, its progress bar moves, it ends completed with its thumbnail.
    # Seconds with SDXL resident, so that the page (a snapshot every 0.5 s) sees the bar move (100
    # steps at most in the form; at 64x64 they ended within one snapshot on a fast 2-core box).
    sdxl_id = await submit(page, "sdxl_image_fast", steps=100, size=128)
    bar = f"#running tr[data-job-id='{sdxl_id}'] .bar"
    await page.wait_for_selector(bar, timeout=60_000)
    seen: set[int] = set()
    done = f"#finished tr[data-job-id='{sdxl_id}']"
    deadline = time.monotonic() + 120
    started = time.monotonic()
    while not await page.locator(done).count():
        assert time.monotonic() < deadline, f"job {sdxl_id} did not end; progress seen {sorted(seen)}"
        # One read in the page: the row may leave #running between two separate locator calls.
        value = await page.evaluate("s => document.querySelector(s)?.dataset.progress ?? null", bar)
        if value is not None:
            seen.add(int(value))
        await asyncio.sleep(0.05)
    assert len(seen) >= 2 and any(0 < v < 100 for v in seen), \
        f"the progress bar did not move: {sorted(seen)} in {time.monotonic() - started:.1f} s"
    assert await page.inner_text(f"{done} .status") == "completed"
    thumb = page.locator(f"{done} img.thumb")
    await thumb.wait_for()
    await page.wait_for_function("s => document.querySelector(s).naturalWidth > 0", arg=f"{done} img.thumb")

    # A payload that is not a job is dead-lettered; the page shows why.
    await stack.queue.push("sdxl_queue", b"this is not a job")
    await page.wait_for_selector("#dead tbody tr td.error-text")
    assert "JSON" in await page.inner_text("#dead tbody tr td.error-text")

    # A long WAN video: cancelled from the page while it generates, it ends cancelled.
    # About 10 s with WAN resident (33 frames at 64x64 could end before the page saw it generate).
    wan_id = await submit(page, "video_fast", steps=100, frames=161, size=96)
    row = f"#running tr[data-job-id='{wan_id}']"
    await page.wait_for_function(
        "s => { const r = document.querySelector(s); return r && r.querySelector('.stage').textContent === 'generating'"
        " && Number(r.querySelector('.bar').dataset.progress) > 0; }", arg=row, timeout=120_000)
    shot = DOCS_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") == "1" else tmp_path / "operator-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000  # a real rendering, not an empty page
    await page.click(f"{row} button.cancel")
    ended = f"#finished tr[data-job-id='{wan_id}'] .status"
    await page.wait_for_selector(ended, timeout=60_000)
    assert await page.inner_text(ended) == "cancelled"
    assert (await stack.queue.get_state(wan_id))["status"] == "cancelled"

    assert not [url for url in page.urls if API_KEY in url]


async def test_model_loads_and_unloads_show_in_the_residency_view(page, stack):
    # The session tritonserver may hold qwen_base from an earlier test (the order is not fixed).
    await stack.residency.unload("qwen_base")
    await login(page)
    state = "#models tr[data-model=qwen_base] .state"
    assert await page.inner_text(state) == "unloaded"
    await page.select_option("#memory-which", "base")
    await page.click("#load")
    await page.wait_for_function("s => document.querySelector(s).textContent === 'ready'", arg=state, timeout=120_000)
    await page.wait_for_selector("#model-ops li[data-model=qwen_base][data-op=load][data-phase=done]")
    assert stack.residency.state("qwen_base") == "ready"

    # An interactive text turn on the loaded model shows in the chat figures.
    async with client(stack) as http:
        assert (await http.post("/enhance/legacy", json={"prompt": "a cat on a wall"})).status_code == 200
    await page.wait_for_function("() => document.querySelector('#chat-rate').textContent === '1'")

    await page.click("#unload")
    await page.wait_for_function("s => document.querySelector(s).textContent === 'unloaded'", arg=state, timeout=60_000)
    await page.wait_for_selector("#model-ops li[data-model=qwen_base][data-op=unload][data-phase=done]")
    assert stack.residency.state("qwen_base") == "unloaded"

    # The cookie opens the page's routes only; the rest of the API still wants the header.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.api_port}") as bare:
        [session] = await page.context.cookies()
        cookie = {"Cookie": f"{session['name']}={session['value']}"}
        assert (await bare.get("/memory/status", headers=cookie)).status_code == 401
        assert (await bare.get("/ui/events", headers={"Cookie": "bridge_ui_session=forged"})).status_code == 401
        # Behind an HTTPS proxy (RunPod's) the cookie is Secure as well.
        proxied = await bare.post("/ui/session", json={"key": API_KEY}, headers={"X-Forwarded-Proto": "https"})
        cookie_line = proxied.headers["set-cookie"].lower()
        assert "secure" in cookie_line and "httponly" in cookie_line and "samesite=strict" in cookie_line
        assert API_KEY.lower() not in cookie_line
