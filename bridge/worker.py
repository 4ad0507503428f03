"""The worker loop: take jobs from Redis, run them on Triton, report what they made.

``start_jobs`` starts one intake task per queue (a blocking ``BLMOVE`` into this worker's
processing list: no polling), the dispatcher (which asks the pure scheduler what runs next, and
what may run beside what: ``GPU_LANES``), the heartbeat/reaper and the cancel listener. Each job goes
``run_job`` (one :class:`RunningJob`) → claim → generate (``bridge/generation.py``: Triton stream,
progress and cancellation, spool) → ``finish_job`` (upload, terminal callback, then ack). A job leaves the processing list only after its terminal
callback was accepted; everything in between survives a crash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from contextlib import suppress
from typing import Any, Awaitable, Callable, TypeVar

from bridge import metrics
from bridge.activity import Activity
from bridge.aio import cancel_until_done
from bridge.app_cancel import AppCancelWatcher
from bridge.dispatcher import Dispatcher, JobFailed
from bridge.generation import Generation, Retry
from bridge.jobs import JOB_TYPES, DeadLetter, InvalidJob, Job, parse_job
from bridge.queue import Begin, Delivery, Queue
from bridge.reporting import Reporter, ReportingDeadline, ReportingError
from bridge.residency import ResidencyManager
from bridge.running_job import RunningJob
from bridge.safety import REFUSAL_REASON
from bridge.safety_paths import job_verdict
from bridge.scheduler import Scheduler
from bridge.settings import Settings
from bridge.spool import JobOutputs, Spool, SpoolEntry, SpoolError
from bridge.supabase_io import SupabaseIO
from bridge.textgen import Enhancer
from bridge.triton_client import TritonClient

log = logging.getLogger(__name__)

QUEUES = tuple(sorted({job_type.queue for job_type in JOB_TYPES.values()}))
TERMINAL_KEY = "terminal_status"  # a spooled failed/cancelled result (no assets)
REPORT_RETRY_PAUSE_S = 5.0  # after a reporting round's deadline passed: pause before the next round
REPORT_RETRY_MAX_PAUSE_S = 120.0
SHUTDOWN_REQUEUE_S = 10.0  # at shutdown, give up putting jobs back after this long (Redis away): the reaper will
T = TypeVar("T")


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
        self.on_triton_failure = on_triton_failure
        self._tasks: list[asyncio.Task] = []
        self._running: dict[str, RunningJob] = {}  # job id -> the run that claimed it here
        self._stopping = False
        self._prefetched = {name: asyncio.Event() for name in QUEUES}  # set: the queue may take its next job
        self._intake: dict[str, asyncio.Task] = {}  # queue -> the job taken last, while it keeps the next out
        # Models whose weights are not on the volume (the runtime sets it: bridge.availability).
        self.missing_models: Callable[[], Any] = frozenset
        self.generation = Generation(self)  # a claimed job's GPU part

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
        await cancel_until_done(self._tasks)
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
            task.add_done_callback(lambda done, name=queue_name: self.free_intake(name, done))
            # The next job of this queue is taken once this one holds the GPU or ends (free_intake).

    def free_intake(self, queue_name: str, task: asyncio.Task | None = None) -> None:
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
                await self.generation.abandon(run.head)  # the job ended before its generation took the request over

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
        head = self.generation.start_early(run) if not run.spooled and run.refusal is None else None
        try:
            begin = run.begin = await began
        except BaseException:
            if head is not None:
                await self.generation.abandon(head)
            raise
        if head is not None and (not begin.ours or self.queue.past_max_attempts(
                dataclasses.replace(delivery, attempt=begin.attempt or delivery.attempt))):
            await self.generation.abandon(head)  # not this worker's to run now: stop the request before anything else
            head = None
        run.head = head

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
            self.free_intake(delivery.queue)  # no GPU needed: the queue may move on
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
                entry = await (self.generation.generate_text(run) if job.type.output == "text"
                               else self.generation.generate(run))
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

    # ------------------------------------------------------------------ terminal states
    async def finish_job(self, run: RunningJob, entry: SpoolEntry) -> None:
        """Upload, send the terminal callback, then (only then) ack and forget the spool."""
        job, delivery = run.job, run.delivery
        assert job is not None
        run.started = True  # a shutdown now waits for it: its end may already be reported
        self.activity.stage(job.id, "uploading")
        await run.quiet_progress()
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
                self.free_intake(run.delivery.queue)  # nothing of this job needs the GPU now
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
        await run.quiet_progress()
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


def _job_refusal(job: Job) -> JobFailed | None:
    """The gate on everything the job sends to its models, every queue and type
    (:func:`bridge.safety_paths.job_verdict`), or None."""
    verdict = job_verdict(job)
    return None if verdict.allowed else JobFailed(verdict.reason or REFUSAL_REASON, "content_refused")


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
