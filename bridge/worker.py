"""The worker loop: take jobs from Redis, run them on Triton, report what they made.

``start_jobs`` starts one intake task per queue (a blocking ``BLMOVE`` into this worker's
processing list: no polling), the dispatcher (which asks the pure scheduler what runs next, and
what may run beside what: ``GPU_LANES``), the heartbeat/reaper and the cancel listener. Each job goes
``run_job`` → generate (Triton stream: progress and cancellation) → spool → ``finish_job``
(upload, terminal callback, then ack). A job leaves the processing list only after its terminal
callback was accepted; everything in between survives a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import io
import logging
import random
import re
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from bridge import metrics
from bridge.activity import Activity
from bridge.app_cancel import AppCancelWatcher
from bridge.chat import prepare_chat
from bridge.dispatcher import Dispatcher, JobFailed, Waiting
from bridge.fetch import FetchError, fetch_job_reference
from bridge.jobs import JOB_TYPES, DeadLetter, InvalidJob, Job, parse_job
from bridge.model_table import Stage, is_interactive, job_cost_s, job_stages
from bridge.queue import Begin, Delivery, Queue
from bridge.reporting import ProgressThrottle, Reporter, ReportingDeadline, ReportingError
from bridge.residency import ResidencyError, ResidencyManager
from bridge.safety import REFUSAL_REASON, check_output
from bridge.safety_paths import job_texts, job_verdict
from bridge.scheduler import Scheduler
from bridge.settings import Settings
from bridge.spool import JobOutputs, OutputAsset, Spool, SpoolEntry, SpoolError
from bridge.supabase_io import SupabaseIO
from bridge.textgen import Enhancer
from bridge.triton_client import InferenceFailed, ModelProcessDied, TritonClient

log = logging.getLogger(__name__)

QUEUES = tuple(sorted({job_type.queue for job_type in JOB_TYPES.values()}))
REFERENCE_MAX_BYTES = 20 * 1024 * 1024
REFERENCE_TIMEOUT_S = 15.0
TERMINAL_KEY = "terminal_status"  # a spooled failed/cancelled result (no assets)
REPORT_RETRY_PAUSE_S = 5.0  # after a reporting round's deadline passed: pause before the next round
REPORT_RETRY_MAX_PAUSE_S = 120.0
SEND_FIRST_S = 0.005  # a finished job waits at most this long for the next job's request to go out
ABANDON_WAIT_S = 10.0  # how long a cancelled head start's request may take to end
SHUTDOWN_REQUEUE_S = 10.0  # at shutdown, give up putting jobs back after this long (Redis away): the reaper will
T = TypeVar("T")


class Retry(Exception):
    """The job may succeed on another attempt (the model process or the server went away)."""


@dataclass(eq=False)
class RunningJob:
    """Everything of one job this worker took, from the take to its end (or back to its queue).

    :meth:`Worker.run_job` makes it and closes it in one place; the lifecycle fills it in as it
    goes: the job once parsed, the claim's answer (``begin``) with the spool stat and the gate's
    verdict found while it was on its way, a request started early (``head``), whether the job
    has started, its cancel, the progress callback and the spool fsync in flight."""

    delivery: Delivery
    task: asyncio.Task
    job: Job | None = None  # None until parsed
    begin: Begin | None = None  # the claim's answer
    spooled: bool = False  # the spool holds a result from before a crash
    refusal: JobFailed | None = None  # the safety gate's, found while the claim was on its way
    head: _HeadStart | None = None  # its request, started while the claim was on its way
    # Past the point of no return: holding the GPU, or reporting its end. Shutdown lets these
    # finish within the grace period; the others go straight back to their queue.
    started: bool = False
    cancelled: bool = False  # the app asked to cancel it
    progress_send: asyncio.Task | None = None  # its progress callback in flight
    spool_sync: asyncio.Task | None = None  # its spool entry's fsync

    @property
    def job_id(self) -> str | None:
        return self.job.id if self.job is not None else self.delivery.job_id


@dataclass
class _HeadStart:
    """A job's request started while its claim was on its way (:meth:`Worker._start_early`)."""

    waiting: Waiting  # its GPU grant
    started: float  # time.monotonic() when the request started
    request: asyncio.Task = field(init=False)
    throttle: ProgressThrottle | None = None  # set once the job is ours: its progress goes there
    adopted: bool = False  # the job's generation took the request and the grant over


class Worker:
    """One bridge process's job runner."""

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Queue,
        triton: TritonClient,
        residency: ResidencyManager,
        reporter: Reporter,
        spool: Spool,
        enhancer: Enhancer,
        on_triton_failure: Callable[[], Awaitable[None]] | None = None,
        activity: Activity | None = None,
        supabase: SupabaseIO | None = None,
    ) -> None:
        self.settings = settings
        self.activity = activity if activity is not None else Activity()  # what the operator's page shows
        self.supabase = supabase  # reference images from Storage; the app's jobs rows (None: local mode)
        self.app_cancel = AppCancelWatcher(supabase, settings.app_cancel_poll_s)
        self.queue = queue
        self.triton = triton
        self.residency = residency
        self.reporter = reporter
        self.spool = spool
        self.enhancer = enhancer
        self.dispatcher = Dispatcher(
            Scheduler(residency.table, aging_s=settings.swap_aging_s, clock=time.monotonic,
                      lanes=settings.gpu_lanes),
            residency,
        )
        self._on_triton_failure = on_triton_failure
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, RunningJob] = {}  # job id -> the run that claimed it here
        self._unsent: set[asyncio.Event] = set()  # requests not yet written to Triton: set once they are
        self._stopping = False
        self._prefetched = {name: asyncio.Event() for name in QUEUES}  # set: the queue may take its next job
        self._intake: dict[str, asyncio.Task] = {}  # queue -> the job taken last, while it keeps the next out
        # Models whose weights are not on the volume (the runtime sets it: bridge.availability).
        self.missing_models: Callable[[], Any] = frozenset

    # ------------------------------------------------------------------ lifecycle
    async def start_jobs(self, queues: Any = None) -> None:
        """Start intake (of ``queues``, default all), dispatch, heartbeat/reaper and the cancel listener."""
        self.dispatcher.start()
        self._tasks.append(asyncio.create_task(self.queue.keep_alive(), name="keep-alive"))
        self._tasks.append(asyncio.create_task(self.queue.listen_cancels(self._cancel_job), name="cancels"))
        self.open_queues(QUEUES if queues is None else queues)

    def open_queues(self, queues: Any) -> list[str]:
        """Start taking jobs from those of ``queues`` not taken from yet (a queue whose models'
        weights are missing is opened once they appear: :mod:`bridge.availability`)."""
        if self._stopping:
            return []
        taking = {task.get_name() for task in self._tasks}
        opened = [name for name in QUEUES if name in set(queues) and f"take:{name}" not in taking]
        for name in opened:
            self._prefetched[name].set()
            self._tasks.append(asyncio.create_task(self._take_jobs(name), name=f"take:{name}"))
        if opened:
            log.info("worker %s taking jobs from %s", self.settings.worker_id, ", ".join(opened))
        return opened

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking jobs, let running ones finish within the grace period, then cancel them
        and put them back at the front of their queue without counting an attempt."""
        self._stopping = True
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        for task in self._tasks:
            if task.get_name().startswith("take:"):
                task.cancel()
        for run in list(self._running.values()):
            if not run.started:  # taken but not started: straight back to the queue
                run.task.cancel()
        running = [run.task for run in self._running.values() if run.started]
        if running:
            log.info("waiting up to %.0fs for %d running job(s)", grace, len(running))
            _, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=30)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.stop()
        # Whatever this worker still holds (taken but not started) goes back, uncounted; with Redis
        # away it stays in the processing lists, which the reaper returns once this heartbeat expires.
        try:
            async with asyncio.timeout(SHUTDOWN_REQUEUE_S):
                await self.queue.release_all()
        except TimeoutError:
            log.error("Redis unreachable for %.0fs at shutdown; this worker's jobs are left to the reaper",
                      SHUTDOWN_REQUEUE_S)

    # ------------------------------------------------------------------ intake
    async def _take_jobs(self, queue_name: str) -> None:
        """Keep one job of ``queue_name`` ready beside the running one (no polling: BLMOVE)."""
        ready = self._prefetched[queue_name]
        while not self._stopping:
            await ready.wait()
            delivery = await self.queue.take(queue_name, timeout=5.0)  # counted when it starts
            if delivery is None:
                continue
            ready.clear()
            task = asyncio.create_task(self.run_job(delivery), name=f"job:{delivery.job_id}")
            self._intake[queue_name] = task
            task.add_done_callback(lambda done, name=queue_name: self._free_intake(name, done))
            # The next job of this queue is taken once this one holds the GPU or ends (_free_intake).

    def _free_intake(self, queue_name: str, task: asyncio.Task | None = None) -> None:
        """``task`` (default: the current one) no longer keeps ``queue_name`` from taking its next
        job: it holds the GPU, needs none, or ended. Only the job taken last counts: a job that
        ends after the next one was taken must not let a third in, or the worker would take the
        whole queue into its processing list, away from other workers."""
        task = task or asyncio.current_task()
        if self._intake.get(queue_name) is task:
            del self._intake[queue_name]
            self._prefetched[queue_name].set()

    # ------------------------------------------------------------------ one job
    async def run_job(self, delivery: Delivery) -> None:
        """Run one delivery to a terminal state (or back to its queue). Never raises.

        Everything of the job lives on its :class:`RunningJob`, made here, and leaves this worker
        in the ``finally`` below (a requeue forgets it a little earlier: :meth:`_requeue`)."""
        run = RunningJob(delivery, asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self._run_delivery(run)
        except asyncio.CancelledError:
            run.task.uncancel()  # we finish the job below
            if run.cancelled:  # (only a job claimed here is cancelled: it was parsed)
                await self._finish_cancelled(run)
                return
            try:
                async with asyncio.timeout(SHUTDOWN_REQUEUE_S):
                    await self._requeue(run, count_attempt=False)
            except TimeoutError:  # Redis is away: the job stays in the processing list for the reaper
                log.error("job %s interrupted by shutdown; Redis unreachable for %.0fs, left in this worker's "
                          "processing list for the reaper", delivery.job_id, SHUTDOWN_REQUEUE_S)
                return
            log.info("job %s interrupted by shutdown; requeued without counting an attempt", delivery.job_id)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the worker or lose the job
            log.exception("job %s: unexpected error; requeued", delivery.job_id)
            if delivery.job_id:
                with suppress(Exception):
                    # The exception's text (paths, internals) stays in the log; the job's state reaches clients.
                    await self.queue.set_state(delivery.job_id, event=False,
                                               error="internal error; the worker's log has the details")
            await self._requeue(run, count_attempt=True)
        finally:
            self._forget(run)

    def _forget(self, run: RunningJob, requeued: bool = False) -> bool:
        """The job leaves this worker's books; True if ``run`` was the one that held it here (a
        duplicate delivery of a job running here holds nothing)."""
        if run.job_id is None or self._running.get(run.job_id) is not run:
            return False
        del self._running[run.job_id]
        self.activity.end(run.job_id, requeued=requeued)
        return True

    async def _run_delivery(self, run: RunningJob) -> None:
        delivery = run.delivery
        try:
            job = run.job = parse_job(delivery.raw)
        except DeadLetter as exc:
            log.warning("dead-lettered a payload from %s: %s", delivery.queue, exc.reason)
            metrics.inc_dead_letter(delivery.queue, "unparseable")
            await self.queue.dead_letter(delivery, exc.reason)
            return
        except InvalidJob as exc:
            await self._refuse(run, exc)
            return
        if job.id in self._running:  # a duplicate of a job running here: acknowledged below
            run.begin = Begin(None, self.settings.worker_id, False)
        else:
            await self._claim(run)
        try:
            await self._run_claimed(run)
        finally:
            if run.head is not None and not run.head.adopted:
                await self._abandon(run.head)  # the job ended before its generation took the request over

    async def _claim(self, run: RunningJob) -> None:
        """One round trip: finished? claimed by a live worker? cancel requested? (docs/ARCHITECTURE.md, process life cycle) The raw
        payload lets the claim check that its owner still holds the job. While it is in flight
        (docs/ARCHITECTURE.md, one job's path: per-job overhead) the local checks run (the spool stat, the safety gate) and,
        when the GPU is free at once, the job's request starts (:meth:`_start_early`). Fills in the
        run's ``begin``, ``spooled``, ``refusal`` and ``head``."""
        job, delivery = run.job, run.delivery
        assert job is not None
        began = asyncio.ensure_future(self.queue.begin(job.id, delivery))  # counted at the start
        try:
            await asyncio.sleep(0)  # the script is sent before the checks below take the loop
            run.spooled, run.refusal = self.spool.has(job.id), _job_refusal(job)
        except BaseException:
            await began  # (also when cancelled meanwhile: the claim is known, then released)
            raise
        head = self._start_early(run) if not run.spooled and run.refusal is None else None
        try:
            begin = run.begin = await began
        except BaseException:
            if head is not None:
                await self._abandon(head)
            raise
        if head is not None and (not begin.ours or self.queue.past_max_attempts(
                dataclasses.replace(delivery, attempt=begin.attempt or delivery.attempt))):
            await self._abandon(head)  # not this worker's to run now: stop the request before anything else
            head = None
        run.head = head

    def _start_early(self, run: RunningJob) -> _HeadStart | None:
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
        head = _HeadStart(waiting, time.monotonic())
        head.request = asyncio.create_task(
            self._infer(job, _render_inputs(job, job.prompt, None), self._on_progress(run, lambda: head.throttle)),
            name=f"request:{job.id}")
        return head

    async def _abandon(self, head: _HeadStart) -> None:
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

    async def _run_claimed(self, run: RunningJob) -> None:
        job, begin, delivery = run.job, run.begin, run.delivery
        assert job is not None and begin is not None
        if begin.finished:
            log.info("job %s already finished; duplicate delivery acknowledged", job.id)
            await self.queue.ack(delivery)
            return
        if begin.owner is not None:
            owner = begin.owner
            # The original delivery is in the processing list of a live worker (maybe this one):
            # it finishes there or goes back to the queue if that worker dies. Nothing is lost.
            log.info("job %s is already running on worker %s; duplicate delivery acknowledged", job.id, owner)
            await self.queue.ack(delivery)
            return
        assert delivery.job_id is not None
        delivery = run.delivery = dataclasses.replace(delivery, attempt=begin.attempt or delivery.attempt)
        self._running[job.id] = run
        self.activity.begin(job.id, job.requested_type, job.model, delivery.queue)
        try:
            # (docs/ARCHITECTURE.md, process life cycle) An unreadable spool is requeued like an unwritable one, not counted as an
            # attempt by the catch-all. (A stat first: most jobs have no entry, no thread needed.)
            entry = await asyncio.to_thread(self.spool.load, job.id) if run.spooled else None
        except SpoolError as exc:
            await self._spool_trouble(run, exc)
            return
        if entry is not None:
            # Generated (or settled as failed/cancelled) before a crash: report that same result
            # again, whatever the attempt count, never a different one.
            log.info("job %s: result found in the spool; reporting it again without generating", job.id)
            self._free_intake(delivery.queue)  # no GPU needed: the queue may move on
            await self._finish_from_spool(run, entry)
            return
        if self.queue.past_max_attempts(delivery):
            state = await self.queue.get_state(job.id) or {}
            last = state.get("error") or "the worker stopped during each run"
            message = f"gave up after {delivery.attempt - 1} attempts; last error: {last}"
            await self._fail(run, JobFailed(message, "attempts_exhausted"), dead_letter=True)
            return
        if begin.cancelled:
            await self._finish_cancelled(run)
            return
        try:
            if run.refusal is not None:
                raise run.refusal
            async with self.app_cancel.watching(job, self._cancel_job):  # the app cancels in its jobs row
                entry = await (self._generate_text(run) if job.type.output == "text" else self._generate(run))
        except asyncio.CancelledError:
            if not run.cancelled:
                raise
            run.task.uncancel()
            await self._finish_cancelled(run)
            return
        except JobFailed as exc:
            await self._fail(run, exc)
            return
        except Retry as exc:
            await self.queue.set_state(job.id, error=str(exc), event=False)
            log.warning("job %s attempt %d failed (%s); requeued", job.id, delivery.attempt, exc)
            await self._requeue(run, count_attempt=True)
            return
        except SpoolError as exc:
            await self._spool_trouble(run, exc)
            return
        await self.finish_job(run, entry)

    async def _spool_trouble(self, run: RunningJob, exc: SpoolError) -> None:
        log.error("job %s: %s; requeued", run.job_id, exc)
        await asyncio.sleep(1.0)  # (docs/ARCHITECTURE.md, process life cycle) pause while the job is still ours, then put it back
        await self._requeue(run, count_attempt=False)

    async def _generate(self, run: RunningJob) -> SpoolEntry:
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
            self._progress(run, throttle, 0.0)
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
                self._progress(run, current, float(outputs["progress"][0]))

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
                await self._recover_model(model, reload=isinstance(exc, ModelProcessDied))
                raise Retry(client_text(exc.message)) from None
            raise JobFailed(client_text(exc.message)) from None

    async def _generate_text(self, run: RunningJob) -> SpoolEntry:
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

    async def _recover_model(self, model: str, reload: bool = False) -> None:
        """A model process or the server died: restart what is needed before the retry."""
        if self._on_triton_failure is not None and not await self.triton.is_live():
            try:
                await self._on_triton_failure()
            except Exception:  # noqa: BLE001 - (docs/ARCHITECTURE.md, process life cycle) a failed restart is this job's retry, not a crash
                log.exception("restarting tritonserver failed; the job will be retried")
            return
        with suppress(Exception):
            if reload:  # its process died: a new one for the retry (unloading a dead one waits ~30 s)
                await self.residency.reload(model)
            else:
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

    @staticmethod
    def _progress(run: RunningJob, throttle: ProgressThrottle, fraction: float) -> None:
        """Send progress in the background: a slow callback must not hold up the GPU. While one
        send is in flight newer progress is skipped (the throttle would drop it anyway)."""
        if run.progress_send is None or run.progress_send.done():
            run.progress_send = asyncio.create_task(throttle.update(round(fraction * 100)))

    @staticmethod
    async def _quiet_progress(run: RunningJob) -> None:
        """Before a terminal callback: let a progress callback on its way land first (it gives up
        within its own short deadline), so nothing arrives after the terminal one."""
        pending, run.progress_send = run.progress_send, None
        if pending is not None:
            with suppress(Exception):
                await pending

    # ------------------------------------------------------------------ terminal states
    async def finish_job(self, run: RunningJob, entry: SpoolEntry) -> None:
        """Upload, send the terminal callback, then (only then) ack and forget the spool."""
        job, delivery = run.job, run.delivery
        assert job is not None
        run.started = True  # a shutdown now waits for it: its end may already be reported
        self.activity.stage(job.id, "uploading")
        await self._quiet_progress(run)
        self._sync_spool(run)
        try:
            t0 = time.monotonic()
            assets = await self._until_delivered(run, lambda: self.reporter.upload_assets(entry))
            upload_s = time.monotonic() - t0
            await self._until_delivered(
                run, lambda: self._report(job.id, "completed", assets=assets, metadata=entry.metadata))
        except (ReportingError, SpoolError) as exc:
            # The app is told what happened, not the text (spool paths, Storage's answers): the log has it.
            log.error("job %s: results could not be stored: %s", job.id, exc)
            where = "written to the worker's disk" if isinstance(exc, SpoolError) else "uploaded to storage"
            await self._fail(run, JobFailed(
                f"results could not be {where}; the worker's log has the details", "storage_error"))
            return
        await self._settle(delivery, job.id, "completed")
        await self._forget_spool(run)
        # End to end from the moment this worker took the job; what is neither generation nor
        # upload is waiting (for the GPU, a model load, or the queue ahead of it at this worker).
        run_s = float(entry.metadata.get("generation_time", 0.0))
        total_s = max(0.0, time.time() - delivery.taken_at)
        metrics.observe_job_finished(job.requested_type, "completed", queue_wait_s=max(0.0, total_s - run_s - upload_s),
                                     run_s=run_s, upload_s=upload_s, total_s=total_s)
        log.info("job %s completed", job.id, extra={"job_id": job.id, "job_type": job.requested_type})

    async def _until_delivered(self, run: RunningJob, send: Callable[[], Awaitable[T]]) -> T:
        """Repeat a reporting round until it gets through. A passed deadline does not drop or
        requeue the job: it stays in this worker's processing list (a crash returns it; the spool
        keeps its outputs) while its queue moves on to the next job and we try again later."""
        pause = REPORT_RETRY_PAUSE_S
        while True:
            try:
                return await send()
            except ReportingDeadline as exc:
                log.warning("job %s: reporting deadline passed (%s); trying again in %.0fs", run.job_id, exc, pause)
                self._free_intake(run.delivery.queue)  # nothing of this job needs the GPU now
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(pause * 2, REPORT_RETRY_MAX_PAUSE_S)

    async def _refuse(self, run: RunningJob, exc: InvalidJob) -> None:
        log.warning("job %s refused: %s", exc.job_id, exc.message)
        metadata = {"error_type": "invalid_payload", "job_type": exc.job_type, "timestamp": _now_iso()}
        if not await self._report_terminal(run, exc.job_id, "failed", exc.message, metadata):
            return
        await self._settle(run.delivery, exc.job_id, "failed")
        metrics.observe_job_finished(exc.job_type or "unknown", "failed")

    async def _fail(self, run: RunningJob, exc: JobFailed, dead_letter: bool = False) -> None:
        job = run.job
        assert job is not None
        log.warning("job %s failed: %s", job.id, exc.message)
        if exc.error_type == "content_refused":
            metrics.inc_safety_refusal(job.type.name)
        metadata = {"error_type": exc.error_type, "job_type": job.requested_type, "timestamp": _now_iso()}
        await self._settle_terminal(run, "failed", exc.message, metadata, dead_letter)

    async def _finish_cancelled(self, run: RunningJob) -> None:
        assert run.job is not None
        metadata = {"job_type": run.job.requested_type, "timestamp": _now_iso()}
        await self._settle_terminal(run, "cancelled", "cancelled on request", metadata)

    async def _settle_terminal(self, run: RunningJob, status: str, message: str, metadata: dict,
                               dead_letter: bool = False, remember: bool = True) -> None:
        """A failed or cancelled end: remembered in the spool first (a crash after the app took
        it re-sends this same result), then reported, then settled. A shutdown meanwhile waits
        for it (cancelled halfway, the job went back to its queue after its end was reported)."""
        job, delivery = run.job, run.delivery
        assert job is not None
        run.started = True
        if remember:
            record = {**metadata, TERMINAL_KEY: status, "error_message": message, "dead_letter": dead_letter}
            try:
                await asyncio.to_thread(self.spool.save, job.id, JobOutputs(job.user_id, job.requested_type, [], record))
            except (SpoolError, ValueError) as exc:  # best effort: the report itself still goes out
                log.warning("job %s: %s result not spooled (%s)", job.id, status, exc)
        if not await self._report_terminal(run, job.id, status, message, metadata):
            return
        if dead_letter:
            await self.queue.mark_finished(job.id, status)
            await self.queue.dead_letter(delivery, message)
            await self.queue.release_claim(job.id)
            metrics.inc_dead_letter(delivery.queue, str(metadata.get("error_type", status)))
        else:
            await self._settle(delivery, job.id, status)
        await self._forget_spool(run)
        metrics.observe_job_finished(job.requested_type, status)

    async def _finish_from_spool(self, run: RunningJob, entry: SpoolEntry) -> None:
        status = entry.metadata.get(TERMINAL_KEY)
        if status is None:
            await self.finish_job(run, entry)
            return
        metadata = {k: v for k, v in entry.metadata.items() if k not in (TERMINAL_KEY, "error_message", "dead_letter")}
        await self._settle_terminal(run, status, entry.metadata.get("error_message") or status, metadata,
                                    dead_letter=bool(entry.metadata.get("dead_letter")), remember=False)

    async def _report_terminal(self, run: RunningJob, job_id: str, status: str, message: str | None,
                               metadata: dict) -> bool:
        """Send a terminal callback until it gets through; False (dead-lettered) if refused."""
        await self._quiet_progress(run)
        try:
            await self._until_delivered(
                run, lambda: self._report(job_id, status, error_message=message, metadata=metadata))
            return True
        except ReportingError as exc:
            log.error("job %s: %s callback rejected (%s); dead-lettered", job_id, status, exc)
            await self.queue.dead_letter(run.delivery, f"{status} callback rejected: {exc}")
            return False

    def _sync_spool(self, run: RunningJob) -> None:
        """fsync the job's spool entry in the background while its results are uploaded: the
        entry survives a crash of this process already, and a power cut once this is done. Off
        the critical path: it costs the job no latency (docs/ARCHITECTURE.md, one job's path)."""
        if run.spool_sync is None:
            run.spool_sync = asyncio.create_task(asyncio.to_thread(self.spool.sync, run.job_id))

    async def _forget_spool(self, run: RunningJob) -> None:
        """The job is settled: its spool entry may go. A failure here costs disk, not the job."""
        job_id = run.job_id
        sync, run.spool_sync = run.spool_sync, None
        try:
            if sync is not None:
                with suppress(SpoolError):  # the entry goes anyway
                    await sync
            await asyncio.to_thread(self.spool.remove, job_id)
        except OSError as exc:
            log.warning("job %s: spool entry not removed (%s); it is settled, nothing is resent", job_id, exc)

    async def _requeue(self, run: RunningJob, count_attempt: bool) -> None:
        """Back to the front of its queue; the claim goes too, so any worker may take it."""
        # (docs/ARCHITECTURE.md, process life cycle) Forget the job first: this worker may take it again at once, and while this task
        # was still registered as running it, the new delivery was acknowledged as a duplicate (lost).
        delivery = run.delivery
        started = self._forget(run, requeued=True) and run.started
        if count_attempt and not started:  # failed before its start: counted all the same (no endless loop)
            await self.queue.count_start(delivery)
        await self.queue.requeue(delivery, count_attempt=count_attempt)
        if delivery.job_id:
            await self.queue.release_claim(delivery.job_id)

    async def _settle(self, delivery: Delivery, job_id: str, status: str) -> None:
        """Remember the status, ack, release the claim: one round trip."""
        await self.queue.settle(delivery, status, job_id)

    async def _report(self, job_id: str, status: str, **kwargs: Any) -> None:
        await self.reporter.send_callback(job_id, status, **kwargs)

    # ------------------------------------------------------------------ cancellation
    async def _cancel_job(self, job_id: str) -> None:
        run = self._running.get(job_id)
        if run is not None and not run.task.done():
            log.info("job %s: cancel requested; stopping its generation", job_id)
            run.cancelled = True
            run.task.cancel()


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
    (Every job passes the safety gate: :func:`_job_refusal`.)"""
    template = job.type.template
    return job.type.output != "text" or (template is not None and template.endswith("_enhance"))


def _job_refusal(job: Job) -> JobFailed | None:
    """The gate on everything the job sends to its models, every queue and type
    (:func:`bridge.safety_paths.job_verdict`), or None."""
    verdict = job_verdict(job)
    return None if verdict.allowed else JobFailed(verdict.reason or REFUSAL_REASON, "content_refused")


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


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
