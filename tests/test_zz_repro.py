import asyncio, time
import httpx
from tests.test_api import _job, wait_for_state, TERMINAL

async def test_repro(http: httpx.AsyncClient, stack) -> None:
    a = (await http.post("/jobs", json=_job("video_fast", width=96, height=96, num_inference_steps=100, frame_num=161))).json()["id"]
    b = (await http.post("/jobs", json=_job("video_fast", width=64, height=64, num_inference_steps=2, frame_num=5))).json()["id"]
    await wait_for_state(http, a, lambda s: s["status"] == "processing" and s.get("progress", 0) > 0)
    await http.post(f"/jobs/{a}/cancel")
    sa = await wait_for_state(http, a, lambda s: s["status"] in TERMINAL, timeout=30)
    sb = await wait_for_state(http, b, lambda s: s["status"] in TERMINAL, timeout=60)
    print(sa["status"], sb["status"])
    assert sb["status"] == "completed"
