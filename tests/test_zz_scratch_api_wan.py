import time
from tests.test_api import stack, http, settings_for, _job  # noqa
from tests.stack import wait_for_state, TERMINAL

async def test_wan(http):
    for size in (64, 32, 64):
        t = time.monotonic()
        r = await http.post("/jobs", json=_job("image_fast", width=size, height=size, num_inference_steps=100))
        jid = r.json()["id"]
        seen = []
        def done(s):
            seen.append((round(time.monotonic() - t, 2), s["status"], s.get("progress")))
            return s["status"] in TERMINAL
        st = await wait_for_state(http, jid, done)
        print("WAN", size, st["status"], time.monotonic() - t, seen[::5])
