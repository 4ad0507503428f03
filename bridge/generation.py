"""A claimed job on the GPU: its grant from the dispatcher, the Triton request (started early when
that costs nothing), an enhancement first for the jobs that have one, the reference image, the
outputs into the spool. The worker (``bridge/worker.py``) runs the lifecycle around it.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import re
import time
from contextlib import asynccontextmanager, suppress
from typing import Any, AsyncIterator, Awaitable, Callable

from bridge.chat import prepare_chat
from bridge.dispatcher import JobFailed, Waiting
from bridge.fetch import FetchError, fetch_job_reference
from bridge.jobs import Job
from bridge.model_table import Stage, is_interactive, job_cost_s, job_stages
from bridge.queue import Delivery
from bridge.reporting import ProgressThrottle
from bridge.residency import ResidencyError
from bridge.running_job import HeadStart, RunningJob
from bridge.safety import REFUSAL_REASON, check_output
from bridge.safety_paths import job_texts
from bridge.spool import JobOutputs, OutputAsset, SpoolEntry
from bridge.triton_client import InferenceFailed, ModelProcessDied

log = logging.getLogger(__name__)

REFERENCE_MAX_BYTES = 20 * 1024 * 1024
REFERENCE_TIMEOUT_S = 15.0
SEND_FIRST_S = 0.005  # a finished job waits at most this long for the next job's request to go out
ABANDON_WAIT_S = 10.0  # how long a cancelled head start's request may take to end


class Retry(Exception):
    """The job may succeed on another attempt (the model process or the server went away)."""


class Generation:
    """Runs a claimed job's GPU part for the worker; everything of the job is on its :class:`RunningJob`."""

    def __init__(self, worker: Any) -> None:
        """``worker``: the :class:`bridge.worker.Worker` this runs jobs for; its services (queue,
        Triton, residency, dispatcher, spool, reporter, ...) are this one's."""
        w = worker
        self.settings, self.queue, self.triton, self.residency = w.settings, w.queue, w.triton, w.residency
        self.reporter, self.spool, self.enhancer, self.dispatcher = w.reporter, w.spool, w.enhancer, w.dispatcher
        self.activity, self.supabase, self._on_triton_failure = w.activity, w.supabase, w.on_triton_failure
        self.missing_models = lambda: w.missing_models()  # models whose weights are not on the volume
        self._free_intake = w.free_intake  # the job holds the GPU: its queue may take the next one
        self._unsent: set[asyncio.Event] = set()  # requests not yet written to Triton: set once they are

    def start_early(self, run: RunningJob) -> HeadStart | None:
        """Start the job's request before its claim is known, when that costs nothing if the claim
        says no: a one-stage generation with no reference image to fetch, its model resident, the
        GPU granted at once. Its progress is reported only once the job is ours; nothing else of
        it is (no callback, state or spool entry), so a duplicate only has its request cancelled."""
        job = run.job
        assert job is not None
        stages = job_stages(job.type.name)
        if (job.type.output == "text" or len(stages) != 1 or job.reference_image_url
                or self.residency.state(job.model) != "ready"):
            return None
        waiting = self._waiting_for(run, stages[0].models, stages[0])
        if not self.dispatcher.try_acquire(waiting):
            return None
        head = HeadStart(waiting, time.monotonic())
        head.request = asyncio.create_task(
            self._infer(job, _render_inputs(job, job.prompt, None), self._on_progress(run, lambda: head.throttle)),
            name=f"request:{job.id}")
        return head

    async def abandon(self, head: HeadStart) -> None:
        """Cancel a head start's request (if it still runs) and give its GPU grant back. A request
        that has not ended :data:`ABANDON_WAIT_S` after its cancel is logged with where it waits
        and left to end on its own: the job goes on (to its duplicate ack or failed callback)."""
        request = head.request
        if not request.done():
            request.cancel()
            await asyncio.wait([request], timeout=ABANDON_WAIT_S)
        if not request.done():
            stack = io.StringIO()
            request.print_stack(file=stack)
            log.warning("request %s did not end %.0fs after its cancel; going on without it:\n%s",
                        request.get_name(), ABANDON_WAIT_S, stack.getvalue())
        request.add_done_callback(_retrieve)  # its outcome does not matter any more
        self.dispatcher.release(head.waiting)

    async def generate(self, run: RunningJob) -> SpoolEntry:
        """Safety gate, enhancement, reference image, the Triton run (``head``: already started
        while the job was claimed); outputs into the spool.

        An enhanced job holds the GPU twice (docs/APP_CONTRACT.md §3: "qwen_base, then wan"): Qwen Base for
        the enhancement, released, then WAN for the render. Holding both at once put 55 GB of
        models on a 47 GB card beside SDXL and chat, so the chat model was evicted for the render.
        """
        job, head = run.job, run.head
        assert job is not None
        *enhance_stage, render = job_stages(job.type.name)  # (the gate passed job.prompt before)
        prompt, enhancement, enhance_s, throttle = job.prompt, None, 0.0, None
        # Downloaded before asking for the GPU (up to REFERENCE_TIMEOUT_S): never while holding it.
        reference = await self._reference_image(job) if head is None else None
        absent = sorted(set(enhance_stage[0].models) & set(self.missing_models())) if enhance_stage else []
        if absent:  # the enhancement model is not on the volume: its fallback, the original prompt
            enhancement = await self.enhancer.without_model(
                job.prompt, "wan", f"enhancement skipped: the weights of {', '.join(absent)} are not on the volume; "
                "the original prompt was used")
            prompt = enhancement.prompt
        elif enhance_stage:
            async with self._holding_gpu(run, enhance_stage[0].models, enhance_stage[0]) as throttle:
                self.activity.stage(job.id, "enhancing")
                started = time.monotonic()
                enhancement = await self.enhancer.enhance(job.prompt, kind="wan")  # falls back, never fails
                enhance_s = time.monotonic() - started
            prompt = enhancement.prompt
            _check_output(prompt, job)
        held = head.waiting if head is not None else None
        async with self._holding_gpu(run, render.models, render, throttle, held) as throttle:
            self.activity.stage(job.id, "generating")
            if head is not None:
                head.adopted = True  # the grant is released with this block, the request ends in it
                started = head.started
                head.throttle = throttle  # its progress is reported from now on
                outputs = await head.request
            else:
                started = time.monotonic() - enhance_s  # generation_time: the enhancement and the render
                outputs = await self._infer(job, _render_inputs(job, prompt, reference),
                                            self._on_progress(run, lambda: throttle))
            elapsed = time.monotonic() - started
        await self._let_requests_go_first()
        return await asyncio.to_thread(self._spool, job, prompt, enhancement, outputs, elapsed)

    @asynccontextmanager
    async def _holding_gpu(self, run: RunningJob, models: Any, stage: Stage | None = None,
                           throttle: ProgressThrottle | None = None,
                           held: Waiting | None = None) -> AsyncIterator[ProgressThrottle]:
        """Report ``processing`` (once per job: pass the first grant's ``throttle`` to a later
        one), wait for the dispatcher's grant (``held``: granted already), hold it for the block.
        ``stage`` gives the grant's key and expected time when the job holds the GPU more than
        once; every grant of a job keeps the job's age, so a later stage is not sent to the back."""
        job, delivery = run.job, run.delivery
        assert job is not None
        if throttle is None:
            throttle = ProgressThrottle(self.reporter, job.id, metadata={"job_type": job.requested_type})
            run.send_progress(throttle, 0.0)
        waiting = held or self._waiting_for(run, models, stage)
        if held is None:
            await self.dispatcher.acquire(waiting)
        # The job really starts now: only this costs an attempt. Counted beside the request, not
        # before it: a Redis round trip in front of every request delayed it past the previous
        # job's storing (docs/ARCHITECTURE.md, "One job's path"); the block waits for it at its end.
        counting = None if run.started else asyncio.create_task(self._count_start(delivery, job.id))
        run.started = True
        self._free_intake(delivery.queue)  # this job holds the GPU: the next one may be taken
        try:
            yield throttle
        finally:
            self.dispatcher.release(waiting)
            if counting is not None:
                await counting

    async def _count_start(self, delivery: Delivery, job_id: str) -> None:
        log.info("job %s started (attempt %d)", job_id, await self.queue.count_start(delivery))

    @staticmethod
    def _waiting_for(run: RunningJob, models: Any, stage: Stage | None) -> Waiting:
        job, delivery = run.job, run.delivery
        assert job is not None
        key, est_s = (stage.key, stage.est_s) if stage is not None else (job.type.name, job_cost_s(job.type.name))
        return Waiting(key, frozenset(models), _monotonic_since(delivery.taken_at),
                       interactive=is_interactive(job.type.name), est_s=est_s,
                       then=stage.then if stage is not None else frozenset())

    def _on_progress(self, run: RunningJob,
                     throttle: Callable[[], ProgressThrottle | None]) -> Callable[[dict], Awaitable[None]]:
        """The request's response handler: its progress to ``throttle()`` (None: not reported)."""
        async def on_response(outputs: dict) -> None:
            current = throttle()
            if current is not None and "progress" in outputs:
                run.send_progress(current, float(outputs["progress"][0]))

        return on_response

    async def _infer(self, job: Job, inputs: dict, on_response) -> dict:
        """One Triton request under the job's time limit; OOM evicts and retries once. Until the
        request is on its way it is in ``_unsent`` (see :meth:`_let_requests_go_first`)."""
        sent = asyncio.Event()
        self._unsent.add(sent)

        async def attempt() -> dict:
            return await self.triton.run(job.model, inputs, on_response=on_response, on_sent=sent.set,
                                         timeout=job.type.time_limit_s, request_id=job.id)

        try:
            async with self._triton_errors(job, job.model):
                return await self.residency.run_with_oom_retry({job.model}, attempt)
        finally:
            self._unsent.discard(sent)

    async def _let_requests_go_first(self) -> None:
        """Before a finished request's results are stored: let the requests that are starting
        (the job the release granted the GPU to) reach the server first, for up to
        :data:`SEND_FIRST_S`. Storing is CPU work on the bridge's cores; done while the next
        request is still being sent, it delayed that request and left the GPU idle (docs/ARCHITECTURE.md, one job's path: a
        full queue cost 2.6 ms per job before, 0.9 ms since). A request whose model must load
        first is not waited for beyond the cap."""
        await asyncio.sleep(0)  # the granted job runs up to its request
        waiters = [asyncio.ensure_future(event.wait()) for event in self._unsent if not event.is_set()]
        if not waiters:
            return
        try:
            await asyncio.wait(waiters, timeout=SEND_FIRST_S)
        finally:
            for waiter in waiters:
                waiter.cancel()

    @asynccontextmanager
    async def _triton_errors(self, job: Job, model: str) -> AsyncIterator[None]:
        """Turn what can go wrong on Triton into a failed job or a retry."""
        try:
            yield
        except TimeoutError:
            raise JobFailed(f"time limit of {job.type.time_limit_s:.0f}s exceeded; generation stopped",
                            "timeout") from None
        except ResidencyError as exc:
            log.warning("job %s: model %s unavailable: %s", job.id, model, exc)
            raise Retry(f"model {model} unavailable: {client_text(str(exc))}") from None
        except InferenceFailed as exc:
            log.warning("job %s: %s failed: %s", job.id, model, exc.message)
            if exc.transient:
                await self._recover_model(model, dead=isinstance(exc, ModelProcessDied))
                raise Retry(client_text(exc.message)) from None
            raise JobFailed(client_text(exc.message)) from None

    async def generate_text(self, run: RunningJob) -> SpoolEntry:
        """A chat-queue job on a Qwen model; the reply goes to the callback's metadata.response."""
        job = run.job
        assert job is not None
        request = job.chat
        model = request.model
        enhance = _gated(job)  # (and the gate passed job.prompt before)
        async with self._holding_gpu(run, {model}):
            self.activity.stage(job.id, "generating")
            started = time.monotonic()
            async with self._triton_errors(job, model):
                if enhance:
                    kind = "wan" if job.metadata.get("target") == "wan" else "sdxl"
                    enhanced = await self.enhancer.enhance(job.prompt, kind=kind, model=model)
                    response, details = enhanced.prompt, enhanced.metadata()
                else:
                    text = self.enhancer.text
                    tokenizer = await asyncio.to_thread(text.tokenizer, model)
                    prepared = prepare_chat(request, tokenizer, template=job.type.template)
                    result = await text.complete(model, prepared.messages, prepared.sampling,
                                                 timeout=job.type.time_limit_s, request_id=job.id)
                    response = prepared.finish(result.text)
                    details = {**prepared.metadata(), "finish_reason": result.finish_reason,
                               "input_tokens": result.input_tokens, "output_tokens": result.output_tokens,
                               "tokens_generated": result.output_tokens}
        _check_output(response, job)  # an answer or a rewrite: the gate reads what a model wrote too
        metadata = {"job_type": job.requested_type, "model": model, "response": response,
                    "generation_time": round(time.monotonic() - started, 3), **details}
        outputs = JobOutputs(job.user_id, job.requested_type, [], metadata)
        return await asyncio.to_thread(functools.partial(self.spool.save, job.id, outputs, durable=False))

    async def _recover_model(self, model: str, dead: bool = False) -> None:
        """A model process or the server failed: restart what is needed before the retry. A model
        whose process died (``dead``) was reloaded already, by ``ResidencyManager.use``."""
        if self._on_triton_failure is not None and not await self.triton.is_live():
            try:
                await self._on_triton_failure()
            except Exception:  # noqa: BLE001 - (docs/ARCHITECTURE.md, process life cycle) a failed restart is this job's retry, not a crash
                log.exception("restarting tritonserver failed; the job will be retried")
            return
        if not dead:
            with suppress(Exception):
                await self.residency.unload(model)

    async def _reference_image(self, job: Job) -> bytes | None:
        if not job.reference_image_url:
            return None
        try:
            return await fetch_job_reference(
                job.reference_image_url, user_id=job.user_id, storage=self.supabase,
                max_bytes=REFERENCE_MAX_BYTES, timeout_s=REFERENCE_TIMEOUT_S,
                allowed_private_hosts=tuple(self.settings.fetch_allowed_hosts),
            )
        except FetchError as exc:
            raise JobFailed(str(exc), "reference_image_error") from None

    def _spool(self, job: Job, prompt: str, enhancement, outputs: dict, elapsed: float) -> SpoolEntry:
        seeds = [int(s) for s in outputs.get("seeds", [])]
        common = {"steps": job.steps, "guidance_scale": job.guidance_scale}
        assets: list[OutputAsset] = []
        if job.type.output == "video":
            fps, frames = int(outputs["fps"][0]), int(outputs["num_frames"][0])
            assets.append(OutputAsset("video", bytes(outputs["video"][0]),
                                      {**common, "seed": seeds[0], "fps": fps, "frame_num": frames},
                                      _previews(outputs, 1)[0]))
        else:
            images = [bytes(b) for b in outputs["images"]]
            for i, (data, preview) in enumerate(zip(images, _previews(outputs, len(images)))):
                assets.append(OutputAsset("image", data, {
                    **common, "seed": seeds[i], "batch_size": len(images),
                    "negative_prompt_used": job.negative_prompt}, preview))
        metadata: dict[str, Any] = {
            "job_type": job.requested_type, "generation_time": round(elapsed, 3),
            "seed": seeds[0] if seeds else None, "prompt": prompt,
        }
        if job.type.output == "video":
            metadata.update(frame_num=assets[0].metadata["frame_num"], fps=assets[0].metadata["fps"])
        else:
            metadata["num_images"] = len(assets)
        if enhancement is not None:
            metadata.update(enhancement.metadata())
        metadata.update(job.notes)  # what was read differently from the payload, and why (bridge.app_payload)
        return self.spool.save(job.id, JobOutputs(job.user_id, job.requested_type, assets, metadata), durable=False)


def _retrieve(task: asyncio.Task) -> None:
    """Done callback: take a task's outcome so that it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def _render_inputs(job: Job, prompt: str, reference: bytes | None) -> dict[str, Any]:
    return {"prompt": prompt, "negative_prompt": job.negative_prompt, "reference_image": reference,
            "parameters": job.triton_parameters()}


def _previews(outputs: dict, count: int) -> list[bytes | None]:
    """The model's WEBP previews, one per asset (the thumbnails), or Nones when it sent none (then
    the spool makes the thumbnails from the files)."""
    previews = [bytes(b) for b in outputs.get("previews", [])]
    return previews if len(previews) == count else [None] * count


def _gated(job: Job) -> bool:
    """Whether the job is a generation or a chat-queue prompt enhancement (not a chat answer).
    (Every job passes the safety gate: ``bridge.worker._job_refusal``.)"""
    template = job.type.template
    return job.type.output != "text" or (template is not None and template.endswith("_enhance"))


def _check_output(text: str, job: Job) -> None:
    """The gate on a model's answer or rewrite, with the job's own texts as its context."""
    verdict = check_output(text, *job_texts(job))
    if not verdict.allowed:
        raise JobFailed(verdict.reason or REFUSAL_REASON, "content_refused")


# What a model's or the server's error text may carry that is no business of the app: the Python
# backend's stack ("At:" and file lines), tracebacks, file paths, network addresses.
_TRACEBACK = "Traceback (most recent call last):"
_STACK = re.compile(r"\n\s*At:\s*\n.*", re.S)
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+-]+){2,}/?")
_ADDRESS = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b|\[[0-9a-fA-F:]+\](?::\d+)?")


def client_text(text: str, limit: int = 500) -> str:
    """An error text fit for the app (the callback's ``error_message``, the job's stored error):
    what went wrong, without stack, paths or addresses, on one line; the log keeps the original."""
    head, _, trace = text.partition(_TRACEBACK)
    if trace.strip():  # a traceback's last line is the error itself
        head = f"{head} {trace.strip().splitlines()[-1]}"
    text = _ADDRESS.sub("<address>", _PATH.sub("<path>", _STACK.sub("", head)))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _monotonic_since(wall_time: float) -> float:
    """A wall-clock time stamp on the monotonic clock the scheduler uses."""
    return time.monotonic() - max(0.0, time.time() - wall_time)
