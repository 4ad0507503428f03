"""Reporting a job's results: Supabase Storage + ``job-callback``, or local mode.

Flow for a finished job (docs/APP_CONTRACT.md §4)::

    entry = spool.save(job_id, JobOutputs(...))      # bytes and thumbnails on disk first (bridge.spool)
    assets = await reporter.upload_assets(entry)     # media + thumbnails stored, asset objects back
    await reporter.send_callback(job_id, "completed", assets=assets, metadata=entry.metadata)
    spool.remove(job_id)

:class:`SupabaseReporter` and :class:`LocalReporter` have the same interface; :func:`make_reporter`
picks one from the settings. Every HTTP call retries network errors, timeouts, 5xx and 429 with
exponential backoff and jitter until a deadline, then raises :class:`ReportingDeadline`; any other
non-2xx answer raises :class:`ReportingRejected`. Nothing is dropped silently. Secrets (the service
key and the callback secret) never appear in a log line, an exception message or a repr.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import hmac
import json
import logging
import os
import random
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import httpx
from pydantic import SecretStr

from bridge.settings import Settings
from bridge.spool import SpoolEntry, check_id, read_spooled
from bridge.supabase_io import StorageFailed, SupabaseIO

if TYPE_CHECKING:
    from bridge.queue import Queue

log = logging.getLogger(__name__)

STATUSES = frozenset({"processing", "completed", "failed", "cancelled"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}
CALLBACK_PATH = "/functions/v1/job-callback"
SIGNATURE_HEADER = "X-Callback-Signature"
UPLOAD_CONCURRENCY = 4  # files of one job uploaded at once
_EXCERPT_CHARS = 300

RecordStatus = Callable[[str, str, list, "str | None", dict], Awaitable[Any]]
"""``record(job_id, status, assets, error_message, metadata)``: where local mode keeps statuses."""


# --- errors -------------------------------------------------------------------------------------


class ReportingError(RuntimeError):
    """Reporting did not get through; the job's results are still in the spool."""


class ReportingDeadline(ReportingError):
    """Retried until the deadline without success (network errors, timeouts, 5xx, 429)."""

    def __init__(self, route: str, attempts: int, elapsed_s: float, last_error: str) -> None:
        self.route, self.attempts, self.elapsed_s, self.last_error = route, attempts, elapsed_s, last_error
        super().__init__(
            f"{route}: no success after {attempts} attempt(s) in {elapsed_s:.1f} s (last error: {last_error}); "
            "results stay spooled for a later retry"
        )


class ReportingRejected(ReportingError):
    """The server refused the request (a 4xx other than 429, or another non-retryable answer)."""

    def __init__(self, route: str, status_code: int, body_excerpt: str) -> None:
        self.route, self.status_code, self.body_excerpt = route, status_code, body_excerpt
        super().__init__(f"{route}: rejected with HTTP {status_code}: {body_excerpt}")


# --- asset objects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StoredAsset:
    """One spooled file, where it goes (relative to the bucket or OUTPUT_DIR) and its content type."""

    source: Path
    path: str
    content_type: str


def content_type_for(path: str) -> str:
    """The Content-Type of a stored file, from its extension (never application/octet-stream)."""
    suffix = Path(path).suffix.lower()
    try:
        return CONTENT_TYPES[suffix]
    except KeyError:
        raise ValueError(f"no content type known for {path!r}") from None


def _layout(entry: SpoolEntry) -> tuple[list[_StoredAsset], list[dict[str, Any]]]:
    """Every file to store (each asset, then its thumbnail) and the asset objects of docs/APP_CONTRACT.md §4.
    Pure: the spool made the thumbnails and the metadata when it saved the entry."""
    check_id("user_id", entry.user_id)
    check_id("job_id", entry.job_id)
    prefix = f"{entry.user_id}/{entry.job_id}"
    files, assets = [], []
    for spooled in entry.assets:
        path, thumb_path = f"{prefix}/{spooled.filename}", f"{prefix}/{spooled.thumbnail}"
        files.append(_StoredAsset(spooled.path, path, content_type_for(path)))
        files.append(_StoredAsset(spooled.thumbnail_path, thumb_path, content_type_for(thumb_path)))
        assets.append({"type": spooled.type, "url": path, "thumbnail_url": thumb_path,
                       "metadata": dict(spooled.metadata)})
    return files, assets


# --- the reporters ------------------------------------------------------------------------------


class Reporter(Protocol):
    """What the worker needs from a reporter (Supabase or local)."""

    async def upload_assets(self, entry: SpoolEntry) -> list[dict[str, Any]]: ...

    async def send_callback(
        self,
        job_id: str,
        status: str,
        assets: list[dict[str, Any]] | None = None,
        error_message: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...


def callback_body(
    job_id: str,
    status: str,
    assets: list[dict[str, Any]] | None = None,
    error_message: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """The exact bytes of a ``job-callback`` body (serialised once; these bytes are signed and sent)."""
    if status not in STATUSES:
        raise ValueError(f"status {status!r} is not one of {sorted(STATUSES)}")
    body = {
        "job_id": job_id,
        "status": status,
        "assets": list(assets or []),
        "error_message": error_message,
        "metadata": dict(metadata or {}),
    }
    # (docs/ARCHITECTURE.md, process life cycle, tests/test_bad_input.py) "replace": an error message may quote a payload value that
    # holds a lone surrogate (valid JSON "\ud800"); strict UTF-8 raised here, the failed callback was
    # never sent and the job was requeued to the front of its queue forever.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")


def sign_body(body: bytes, secret: str | bytes) -> str:
    """The ``X-Callback-Signature`` value: ``sha256=<hex HMAC-SHA256 of body>``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class SupabaseReporter:
    """Supabase Storage uploads and ``job-callback`` calls through :class:`bridge.supabase_io.SupabaseIO`
    (supabase-py's Storage client; the callback's signed bytes by a plain POST), with our retries.

    ``retries`` counts retried attempts (all routes), ``retries_by_route`` per route (``"storage"``,
    ``"job-callback"``); ``on_retry(route, reason)``, when given, is called on each retry, e.g.
    ``lambda route, _: metrics.inc_upload_retry() if route == "storage" else metrics.inc_callback_retry()``.
    """

    def __init__(
        self,
        *,
        url: str,
        service_key: SecretStr,
        callback_secret: SecretStr,
        bucket: str,
        deadline_s: float,
        request_timeout_s: float = 30.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        on_retry: Callable[[str, str], None] | None = None,
        client: httpx.AsyncClient | None = None,
        io: SupabaseIO | None = None,
    ) -> None:
        if not isinstance(service_key, SecretStr) or not isinstance(callback_secret, SecretStr):
            raise TypeError("service_key and callback_secret must be SecretStr")
        self.url = url.rstrip("/")
        self.bucket = bucket
        self.deadline_s = deadline_s
        self.request_timeout_s = request_timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.on_retry = on_retry
        self.retries = 0
        self.retries_by_route: dict[str, int] = {"storage": 0, "job-callback": 0}
        self._service_key = service_key
        self._callback_secret = callback_secret
        self.io = io or SupabaseIO(self.url, service_key, request_timeout_s=request_timeout_s, http=client)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> "SupabaseReporter":
        if settings.supabase_url is None or settings.supabase_service_key is None or settings.job_callback_secret is None:
            raise ValueError("SupabaseReporter needs SUPABASE_URL, SUPABASE_SERVICE_KEY and JOB_CALLBACK_SECRET")
        return cls(
            url=settings.supabase_url,
            service_key=settings.supabase_service_key,
            callback_secret=settings.job_callback_secret,
            bucket=settings.storage_bucket,
            deadline_s=settings.report_deadline_s,
            **options,
        )

    def __repr__(self) -> str:
        return f"SupabaseReporter(url={self.url!r}, bucket={self.bucket!r}, retries={self.retries})"

    async def __aenter__(self) -> "SupabaseReporter":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.io.aclose()

    async def upload(self, path: str, data: bytes, content_type: str, *, deadline: float | None = None) -> None:
        """Store ``data`` at ``path`` inside the bucket (upsert). ``deadline``: a ``time.monotonic()``."""
        if not content_type or content_type.lower().startswith("application/octet-stream"):
            raise ValueError(f"upload of {path!r}: a real content type is required")
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"upload path {path!r} must be relative to the bucket")
        await self._retrying("storage", f"storage upload of {path}", self._deadline(deadline),
                             lambda: self.io.upload(self.bucket, path, data, content_type))

    async def upload_assets(self, entry: SpoolEntry, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """Upload each asset and its thumbnail, up to ``UPLOAD_CONCURRENCY`` files at once (an
        image and its thumbnail take one round trip, not two: docs/ARCHITECTURE.md, one job's path); return the docs/APP_CONTRACT.md §4
        asset objects. One deadline covers the whole round (``report_deadline_s`` from now unless
        given); the first failure stops the other uploads and is raised."""
        deadline = self._deadline(deadline)
        files, assets = _layout(entry)
        slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)

        async def store(item: _StoredAsset) -> None:
            async with slots:
                data = await asyncio.to_thread(read_spooled, item.source)
                await self.upload(item.path, data, item.content_type, deadline=deadline)

        try:
            async with asyncio.TaskGroup() as uploads:
                for item in files:
                    uploads.create_task(store(item))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return assets

    async def send_callback(
        self,
        job_id: str,
        status: str,
        assets: list[dict[str, Any]] | None = None,
        error_message: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """POST the signed callback; return the function's JSON answer (``{}`` if not JSON)."""
        body = callback_body(job_id, status, assets, error_message, metadata)
        headers = {
            "Authorization": f"Bearer {self._service_key.get_secret_value()}",
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_body(body, self._callback_secret.get_secret_value()),
        }
        deadline = time.monotonic() + (self.deadline_s if deadline_s is None else deadline_s)
        label = f"job-callback ({status})"
        response = await self._retrying(
            "job-callback", label, deadline,
            lambda: self.io.post_function(CALLBACK_PATH, body, headers, self.request_timeout_s))
        try:
            answer = response.json()
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {"response": answer}

    def _deadline(self, deadline: float | None) -> float:
        return time.monotonic() + self.deadline_s if deadline is None else deadline

    async def _retrying(self, route: str, label: str, deadline: float, attempt: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``attempt`` with retries (network errors, timeouts, 5xx, 429) until ``deadline``.

        ``attempt`` is one supabase-py call (raising :class:`StorageFailed` when refused) or one
        plain request (an ``httpx.Response``, checked here). ``route`` names the retry counter;
        ``label`` is what messages call the request.
        """
        started = time.monotonic()
        attempts = 0
        last_error = "none"
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReportingDeadline(label, attempts, time.monotonic() - started, last_error)
            attempts += 1
            retry_after = None
            limit = min(self.request_timeout_s, remaining)
            try:
                async with asyncio.timeout(limit):
                    result = await attempt()
            except TimeoutError:
                last_error = f"Timeout: no answer within {limit:.1f} s"
            except httpx.TransportError as exc:
                last_error = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            except StorageFailed as exc:
                if exc.status != 429 and 0 < exc.status < 500:
                    raise ReportingRejected(label, exc.status, self._scrub(f"{exc.error}: {exc.message}")) from None
                last_error = f"HTTP {exc.status}"
            else:
                if not isinstance(result, httpx.Response) or result.is_success:
                    return result
                if result.status_code != 429 and result.status_code < 500:
                    raise ReportingRejected(label, result.status_code, self._excerpt(result))
                last_error = f"HTTP {result.status_code}"
                retry_after = _retry_after_s(result)
            delay = self._backoff(attempts, retry_after)
            remaining = deadline - time.monotonic()
            if delay >= remaining:
                raise ReportingDeadline(label, attempts, time.monotonic() - started, last_error)
            self.retries += 1
            self.retries_by_route[route] = self.retries_by_route.get(route, 0) + 1
            if self.on_retry is not None:
                self.on_retry(route, last_error)
            log.warning("%s: attempt %d failed (%s); retrying in %.2f s", label, attempts, last_error, delay)
            await asyncio.sleep(delay)

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half fixed, half random); at least Retry-After."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after or 0.0)

    def _excerpt(self, response: httpx.Response) -> str:
        try:
            text = response.text
        except Exception:  # undecodable body
            text = repr(response.content[:_EXCERPT_CHARS])
        text = " ".join(text.split())[:_EXCERPT_CHARS] or "(empty body)"
        return self._scrub(text)

    def _scrub(self, text: str) -> str:
        """Remove the secrets from text that came from outside (a server may echo a header)."""
        for secret in (self._service_key.get_secret_value(), self._callback_secret.get_secret_value()):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class LocalReporter:
    """Local mode: assets under ``OUTPUT_DIR/{user_id}/{job_id}/``, statuses through ``record``.

    Asset ``url``/``thumbnail_url`` are paths relative to ``output_dir``, as they would be
    relative to the bucket.
    """

    def __init__(self, output_dir: Path | str, record: RecordStatus) -> None:
        self.output_dir = Path(output_dir)
        self._record = record

    def __repr__(self) -> str:
        return f"LocalReporter({str(self.output_dir)!r})"

    async def __aenter__(self) -> "LocalReporter":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        return None

    async def upload_assets(self, entry: SpoolEntry, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """Put each spooled asset and its thumbnail in place; return the asset objects (``deadline``
        is ignored). Hard links: a few system calls and no bytes copied, cheap enough to run on the
        event loop (docs/ARCHITECTURE.md, one job's path: per-job overhead). Where the file system refuses a link (OUTPUT_DIR on
        another device than the spool), the files are copied in a thread instead."""
        files, assets = _layout(entry)
        try:
            self._place(files, os.link)
        except OSError:
            try:
                await asyncio.to_thread(self._place, files, shutil.copyfile)
            except OSError as exc:
                raise ReportingError(f"local output {exc.filename or self.output_dir}: cannot write: "
                                     f"{exc.strerror or exc}") from None
        return assets

    async def send_callback(
        self,
        job_id: str,
        status: str,
        assets: list[dict[str, Any]] | None = None,
        error_message: str | None = None,
        metadata: dict[str, Any] | None = None,
        *,
        deadline_s: float | None = None,
    ) -> dict[str, Any]:
        """Record the status through ``record``; return its answer when it is a dict."""
        body = json.loads(callback_body(job_id, status, assets, error_message, metadata))
        answer = await self._record(job_id, status, body["assets"], error_message, body["metadata"])
        return answer if isinstance(answer, dict) else {"success": True}

    def _place(self, files: list[_StoredAsset], put: Callable[[Path, Path], Any]) -> None:
        """``put`` each spooled file at its path under ``output_dir``, atomically (a temporary name,
        then a rename) and not fsync'd: local mode is one machine and a person; the spool entry the
        files come from is fsync'd in the background until the job is settled."""
        for item in files:
            target = self.output_dir / item.path
            temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                put(item.source, temp)
                os.replace(temp, target)
            except OSError:
                temp.unlink(missing_ok=True)
                raise


def supabase_io_of(reporter: Any) -> SupabaseIO | None:
    """The Supabase client a reporter (or a reporter wrapping one, ``.inner``) talks through; None
    in local mode. The worker reads reference images and the app's jobs rows through it too."""
    while reporter is not None:
        if isinstance(reporter, SupabaseReporter):
            return reporter.io
        reporter = getattr(reporter, "inner", None)
    return None


def make_reporter(settings: Settings, record: RecordStatus, **options: Any) -> SupabaseReporter | LocalReporter:
    """A :class:`LocalReporter` without ``SUPABASE_URL``, else a :class:`SupabaseReporter`."""
    if settings.local_mode:
        return LocalReporter(settings.output_dir, record)
    return SupabaseReporter.from_settings(settings, **options)


# --- state recording (the API's /jobs views, local mode's status record) ---------------------


async def record_state(queue: Queue, job_id: str, status: str, assets: Any = None,
                       error_message: str | None = None, metadata: dict | None = None) -> None:
    """Keep a job's state in Redis: local mode's status record, and the API's /jobs view."""
    fields: dict[str, Any] = {"status": status}
    if assets:
        fields["assets"] = assets
    if error_message:
        fields["error"] = error_message
    if metadata:
        fields["metadata"] = metadata
        if "progress" in metadata:
            fields["progress"] = metadata["progress"]
    if status == "completed":
        fields["progress"] = 100
    await queue.set_state(job_id, **fields)


class RecordingReporter:
    """A Supabase reporter that also keeps each status in Redis (for the API's /jobs views).

    (The local reporter records through ``record_state`` itself.)
    """

    def __init__(self, inner: Reporter, queue: Queue) -> None:
        self.inner = inner
        self.queue = queue

    async def upload_assets(self, entry: SpoolEntry, **kwargs: Any) -> list[dict[str, Any]]:
        return await self.inner.upload_assets(entry, **kwargs)

    async def send_callback(self, job_id: str, status: str, assets: Any = None, error_message: str | None = None,
                            metadata: dict | None = None, **kwargs: Any) -> dict[str, Any]:
        answer = await self.inner.send_callback(job_id, status, assets, error_message, metadata, **kwargs)
        await record_state(self.queue, job_id, status, assets, error_message, metadata)
        return answer

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- progress -----------------------------------------------------------------------------------


class ProgressThrottle:
    """Sends ``processing`` callbacks with ``metadata.progress`` (0-100) for one job.

    The first update always goes out (the "work started" callback); later ones at most once per
    ``interval_s``, only when progress moved forward. Progress is best-effort: a failed send is
    logged and does not fail the job (each send retries for at most ``deadline_s``).
    """

    def __init__(
        self,
        reporter: Reporter,
        job_id: str,
        *,
        interval_s: float = 1.0,
        deadline_s: float = 10.0,
        metadata: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reporter = reporter
        self.job_id = job_id
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self.metadata = dict(metadata or {})
        self.last_percent: int | None = None
        self.sent = 0
        self._clock = clock
        self._last_sent_at: float | None = None
        self._in_flight = False

    async def update(self, percent: float) -> bool:
        """Report ``percent`` (clamped to 0-100) if the throttle allows it; True when sent."""
        value = int(max(0.0, min(100.0, float(percent))))
        now = self._clock()
        if self._in_flight:
            return False
        if self._last_sent_at is not None:
            if self.last_percent is not None and value <= self.last_percent:
                return False
            if now - self._last_sent_at < self.interval_s:
                return False
        self._in_flight = True
        self._last_sent_at = now
        try:
            await self.reporter.send_callback(
                self.job_id, "processing", metadata={**self.metadata, "progress": value}, deadline_s=self.deadline_s
            )
        except ReportingError as exc:
            log.warning("job %s: progress %d%% not reported: %s", self.job_id, value, exc)
            return False
        finally:
            self._in_flight = False
        self.last_percent = value
        self.sent += 1
        return True
