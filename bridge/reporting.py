"""Reporting a job's results: the upload spool, Supabase Storage + ``job-callback``, and local mode.

Flow for a finished job (CONTRACT §4)::

    entry = spool.save(job_id, JobOutputs(...))      # bytes on disk first: a restart re-sends
    assets = await reporter.upload_assets(entry)     # media + thumbnails, asset objects back
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
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Literal, Protocol
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from bridge.settings import Settings

log = logging.getLogger(__name__)

AssetType = Literal["image", "video"]
STATUSES = frozenset({"processing", "completed", "failed", "cancelled"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
CONTENT_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}
THUMB_EDGE = 256
THUMB_QUALITY = 85
CALLBACK_PATH = "/functions/v1/job-callback"
SIGNATURE_HEADER = "X-Callback-Signature"
MANIFEST = "manifest.json"

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_IMAGE_KEYS = ("seed", "steps", "guidance_scale", "negative_prompt_used")
_VIDEO_KEYS = ("seed", "fps", "frame_num")
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


class SpoolError(OSError):
    """The spool cannot be written or read (disk full, unwritable); the job should be requeued."""


# --- what a job produced, and the spool ----------------------------------------------------------


@dataclass(frozen=True)
class OutputAsset:
    """One generated file and its generation parameters.

    Image metadata needs ``seed`` (this image's), ``steps``, ``guidance_scale`` and
    ``negative_prompt_used``; ``batch_size`` defaults to the number of images. Video metadata needs
    ``seed``, ``fps`` and ``frame_num``. Width, height, format, file size, asset index and (video)
    duration are filled in from the file itself. Other keys are passed through.
    """

    type: AssetType
    data: bytes
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobOutputs:
    """Everything needed to finish reporting a generated job."""

    user_id: str
    job_type: str
    assets: list[OutputAsset]
    metadata: dict[str, Any] = field(default_factory=dict)
    """The terminal callback's metadata (job_type, generation_time, seed, prompt, ...)."""


@dataclass(frozen=True)
class SpooledAsset:
    type: AssetType
    filename: str
    path: Path
    metadata: dict[str, Any]

    def read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise SpoolError(f"spool: cannot read {self.path}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class SpoolEntry:
    job_id: str
    user_id: str
    job_type: str
    assets: list[SpooledAsset]
    metadata: dict[str, Any]
    directory: Path
    created_at: float


class Spool:
    """Generated bytes kept on local disk until they are reported: ``{dir}/{job_id}/`` holds the
    asset files and ``manifest.json``. An entry appears atomically (written in a temporary folder,
    then renamed), so a present manifest means a complete entry."""

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"Spool({str(self.directory)!r})"

    def has(self, job_id: str) -> bool:
        """Whether ``job_id`` has an entry (one stat; cheap enough for the event loop)."""
        _check_id("job_id", job_id)
        return (self.directory / job_id / MANIFEST).exists()

    def save(self, job_id: str, outputs: JobOutputs, *, durable: bool = True) -> SpoolEntry:
        """Write ``outputs`` for ``job_id`` (replacing an earlier entry). Raises :class:`SpoolError`.

        The entry survives a crash of this process as soon as ``save`` returns. With ``durable``
        its files are also fsync'd (it survives a power cut); without, call :meth:`sync` later
        (the worker does so in the background while it uploads, issue 3: per-job overhead).
        Blocking file I/O: from a coroutine, ``await asyncio.to_thread(spool.save, ...)``.
        """
        _check_id("job_id", job_id)
        _check_id("user_id", outputs.user_id)
        files = _asset_files(outputs.assets)
        manifest = {
            "version": 1,
            "job_id": job_id,
            "user_id": outputs.user_id,
            "job_type": outputs.job_type,
            "created_at": time.time(),
            "assets": [
                {"type": asset.type, "file": name, "size": len(asset.data), "metadata": asset.metadata}
                for asset, name in zip(outputs.assets, files)
            ],
            "metadata": outputs.metadata,
        }
        try:
            manifest_bytes = json.dumps(manifest, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"job {job_id}: outputs metadata is not JSON-serialisable ({exc})") from None
        temp = self.directory / f".tmp-{job_id}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            temp.mkdir()
            for asset, name in zip(outputs.assets, files):
                _write_file(temp / name, asset.data, durable)
            _write_file(temp / MANIFEST, manifest_bytes, durable)
            self._replace_entry(job_id, temp, durable)
        except OSError as exc:
            shutil.rmtree(temp, ignore_errors=True)
            raise SpoolError(
                f"spool directory {self.directory}: cannot save job {job_id}: {exc.strerror or exc}"
                f"{f' ({exc.filename})' if exc.filename else ''}"
            ) from None
        return self._entry_from_manifest(job_id, manifest)

    def sync(self, job_id: str) -> None:
        """fsync the files of ``job_id``'s entry and the folders that name them (after a save
        with ``durable=False``). An entry removed meanwhile is fine."""
        _check_id("job_id", job_id)
        entry = self.directory / job_id
        try:
            for child in entry.iterdir():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: cannot sync job {job_id}: {exc.strerror or exc}") from None
        _fsync_dir(entry)
        _fsync_dir(self.directory)

    def load(self, job_id: str) -> SpoolEntry | None:
        """The complete entry of ``job_id``, or None when there is none.

        An entry that is not whole (a power cut before it was synced can leave a manifest that
        does not parse or files shorter than recorded) is removed and reported as none: the job
        is generated again rather than requeued forever or reported with broken files."""
        _check_id("job_id", job_id)
        path = self.directory / job_id / MANIFEST
        try:
            manifest = json.loads(path.read_bytes())
            entry = self._entry_from_manifest(job_id, manifest)
            problem = _incomplete(entry, manifest)
        except FileNotFoundError:
            return None
        except (ValueError, SpoolError) as exc:  # SpoolError: a manifest that lacks a field
            problem = f"unreadable manifest ({exc})"
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: cannot read {path}: {exc.strerror or exc}") from None
        if problem is None:
            return entry
        log.warning("spool entry of job %s is not whole (%s); it is discarded and the job generated again",
                    job_id, problem)
        self.remove(job_id)
        return None

    def remove(self, job_id: str) -> None:
        """Forget ``job_id``'s entry (after its terminal callback got through). Missing is fine."""
        _check_id("job_id", job_id)
        path = self.directory / job_id
        trash = self.directory / f".del-{job_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, trash)  # the entry disappears atomically, then is deleted
        except FileNotFoundError:
            return
        except OSError as exc:
            raise SpoolError(f"spool directory {self.directory}: cannot remove job {job_id}: {exc.strerror or exc}") from None
        shutil.rmtree(trash, ignore_errors=True)

    def pending(self) -> list[str]:
        """Job ids with a complete entry, oldest first (for re-sending after a restart)."""
        if not self.directory.is_dir():
            return []
        entries = []
        for child in self.directory.iterdir():
            manifest = child / MANIFEST
            if not child.name.startswith(".") and manifest.is_file():
                entries.append((manifest.stat().st_mtime, child.name))
        return [name for _, name in sorted(entries)]

    def _replace_entry(self, job_id: str, temp: Path, durable: bool) -> None:
        final = self.directory / job_id
        old = None
        if final.exists():
            old = self.directory / f".del-{job_id}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(temp, final)
        if durable:
            _fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _entry_from_manifest(self, job_id: str, manifest: dict[str, Any]) -> SpoolEntry:
        directory = self.directory / job_id
        try:
            assets = [
                SpooledAsset(item["type"], item["file"], directory / item["file"], dict(item["metadata"]))
                for item in manifest["assets"]
            ]
            return SpoolEntry(
                job_id=manifest["job_id"],
                user_id=manifest["user_id"],
                job_type=manifest["job_type"],
                assets=assets,
                metadata=dict(manifest["metadata"]),
                directory=directory,
                created_at=float(manifest["created_at"]),
            )
        except (KeyError, TypeError) as exc:
            raise SpoolError(f"spool directory {self.directory}: manifest of job {job_id} lacks {exc}") from None


def _check_id(name: str, value: str) -> None:
    """Ids become path components: refuse anything that could leave its folder."""
    if not isinstance(value, str) or not _ID_RE.match(value) or ".." in value:
        raise ValueError(f"{name} {value!r} is not a safe identifier")


def _asset_files(assets: list[OutputAsset]) -> list[str]:
    """File names of a job's assets (``{i}.png`` or ``0.mp4``), checking the assets on the way.
    A text job (chat queue) has none: its result is in the metadata."""
    if not assets:
        return []
    kinds = {asset.type for asset in assets}
    if kinds == {"video"}:
        if len(assets) != 1:
            raise ValueError("a video job has exactly one asset")
    elif kinds != {"image"}:
        raise ValueError(f"assets must be all images or one video, got {sorted(kinds)}")
    names = []
    for index, asset in enumerate(assets):
        required = _IMAGE_KEYS if asset.type == "image" else _VIDEO_KEYS
        missing = [key for key in required if key not in asset.metadata]
        if missing:
            raise ValueError(f"{asset.type} asset {index} metadata lacks {missing}")
        if asset.type == "image" and not asset.data.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"image asset {index} is not a PNG")
        if asset.type == "video" and asset.data[4:8] != b"ftyp":
            raise ValueError("video asset is not an MP4")
        names.append(f"{index}.png" if asset.type == "image" else "0.mp4")
    return names


def _incomplete(entry: SpoolEntry, manifest: dict[str, Any]) -> str | None:
    """Why ``entry``'s files do not match its manifest, or None when they do."""
    for asset, item in zip(entry.assets, manifest["assets"]):
        try:
            size = asset.path.stat().st_size
        except FileNotFoundError:
            return f"{asset.filename} is missing"
        if "size" in item and size != item["size"]:
            return f"{asset.filename} has {size} bytes, not {item['size']}"
    return None


def _write_file(path: Path, data: bytes, durable: bool = True) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- asset objects and thumbnails ---------------------------------------------------------------


@dataclass(frozen=True)
class _PreparedAsset:
    """One asset ready to store: its file, its thumbnail and its CONTRACT §4 object."""

    path: str
    content_type: str
    data: bytes
    thumb_path: str
    thumb: bytes
    asset: dict[str, Any]


def content_type_for(path: str) -> str:
    """The Content-Type of a stored file, from its extension (never application/octet-stream)."""
    suffix = Path(path).suffix.lower()
    try:
        return CONTENT_TYPES[suffix]
    except KeyError:
        raise ValueError(f"no content type known for {path!r}") from None


def _prepare_assets(entry: SpoolEntry) -> list[_PreparedAsset]:
    """Read the spooled files, make the thumbnails and the asset objects (CPU work: run in a thread)."""
    from model_kit.media import thumbnail_webp, video_middle_frame  # noqa: PLC0415 (heavy imports)
    from PIL import Image  # noqa: PLC0415

    _check_id("user_id", entry.user_id)
    _check_id("job_id", entry.job_id)
    prefix = f"{entry.user_id}/{entry.job_id}"
    batch_size = len(entry.assets)
    prepared = []
    for index, spooled in enumerate(entry.assets):
        data = spooled.read_bytes()
        meta = dict(spooled.metadata)
        if spooled.type == "image":
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                thumb = thumbnail_webp(image, longest_edge=THUMB_EDGE, quality=THUMB_QUALITY)
            meta.setdefault("batch_size", batch_size)
            meta.update(format="png")
        else:
            frame = video_middle_frame(data)
            width, height = frame.size
            thumb = thumbnail_webp(frame, longest_edge=THUMB_EDGE, quality=THUMB_QUALITY)
            meta.update(format="mp4", duration_seconds=meta["frame_num"] / meta["fps"])
        meta.update(width=width, height=height, file_size_bytes=len(data), asset_index=index)
        path = f"{prefix}/{spooled.filename}"
        thumb_path = f"{prefix}/{index}.thumb.webp"
        asset = {"type": spooled.type, "url": path, "thumbnail_url": thumb_path, "metadata": meta}
        prepared.append(_PreparedAsset(path, content_type_for(path), data, thumb_path, thumb, asset))
    return prepared


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
    # (issue 7, tests/test_bad_input.py) "replace": an error message may quote a payload value that
    # holds a lone surrogate (valid JSON "\ud800"); strict UTF-8 raised here, the failed callback was
    # never sent and the job was requeued to the front of its queue forever.
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8", "replace")


def sign_body(body: bytes, secret: str | bytes) -> str:
    """The ``X-Callback-Signature`` value: ``sha256=<hex HMAC-SHA256 of body>``."""
    key = secret.encode("utf-8") if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


class SupabaseReporter:
    """Supabase Storage uploads and ``job-callback`` calls over one ``httpx.AsyncClient``.

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
        self._client = client or httpx.AsyncClient(timeout=request_timeout_s, follow_redirects=False)

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
        await self._client.aclose()

    async def upload(self, path: str, data: bytes, content_type: str, *, deadline: float | None = None) -> None:
        """Store ``data`` at ``path`` inside the bucket (upsert). ``deadline``: a ``time.monotonic()``."""
        if not content_type or content_type.lower().startswith("application/octet-stream"):
            raise ValueError(f"upload of {path!r}: a real content type is required")
        if path.startswith("/") or ".." in path.split("/"):
            raise ValueError(f"upload path {path!r} must be relative to the bucket")
        url = f"{self.url}/storage/v1/object/{quote(self.bucket, safe='')}/{quote(path, safe='/')}"
        headers = self._auth_headers()
        headers.update({"Content-Type": content_type, "x-upsert": "true"})
        await self._send("storage", f"storage upload of {path}", url, headers, data, self._deadline(deadline))

    async def upload_assets(self, entry: SpoolEntry, *, deadline: float | None = None) -> list[dict[str, Any]]:
        """Upload each asset and its thumbnail; return the CONTRACT §4 asset objects.

        One deadline covers the whole round (``report_deadline_s`` from now unless given).
        """
        deadline = self._deadline(deadline)
        prepared = await asyncio.to_thread(_prepare_assets, entry)
        for item in prepared:
            await self.upload(item.path, item.data, item.content_type, deadline=deadline)
            await self.upload(item.thumb_path, item.thumb, "image/webp", deadline=deadline)
        return [item.asset for item in prepared]

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
        response = await self._send("job-callback", label, f"{self.url}{CALLBACK_PATH}", headers, body, deadline)
        try:
            answer = response.json()
        except ValueError:
            return {}
        return answer if isinstance(answer, dict) else {"response": answer}

    def _auth_headers(self) -> dict[str, str]:
        key = self._service_key.get_secret_value()
        return {"Authorization": f"Bearer {key}", "apikey": key}

    def _deadline(self, deadline: float | None) -> float:
        return time.monotonic() + self.deadline_s if deadline is None else deadline

    async def _send(
        self, route: str, label: str, url: str, headers: dict[str, str], body: bytes, deadline: float
    ) -> httpx.Response:
        """POST with retries (network errors, timeouts, 5xx, 429) until ``deadline``.

        ``route`` names the retry counter; ``label`` is what messages call the request.
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
            try:
                response = await self._client.post(
                    url, content=body, headers=headers, timeout=min(self.request_timeout_s, remaining)
                )
            except httpx.TransportError as exc:
                last_error = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            else:
                if response.is_success:
                    return response
                if response.status_code != 429 and response.status_code < 500:
                    raise ReportingRejected(label, response.status_code, self._excerpt(response))
                last_error = f"HTTP {response.status_code}"
                retry_after = _retry_after_s(response)
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
        """Write each asset and its thumbnail; return the asset objects. ``deadline`` is ignored."""
        return await asyncio.to_thread(self._write_all, entry)

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

    def _write_all(self, entry: SpoolEntry) -> list[dict[str, Any]]:
        prepared = _prepare_assets(entry)
        for item in prepared:
            self._write(item.path, item.data)
            self._write(item.thumb_path, item.thumb)
        return [item.asset for item in prepared]

    def _write(self, relative: str, data: bytes) -> None:
        """Atomically (a temporary file, then a rename), not fsync'd: local mode is one machine
        and a person, and its per-job overhead counts (issue 3); the spool entry the outputs come
        from is fsync'd in the background until the job is settled."""
        target = self.output_dir / relative
        temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_file(temp, data, durable=False)
            os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise ReportingError(f"local output {target}: cannot write: {exc.strerror or exc}") from None


def make_reporter(settings: Settings, record: RecordStatus, **options: Any) -> SupabaseReporter | LocalReporter:
    """A :class:`LocalReporter` without ``SUPABASE_URL``, else a :class:`SupabaseReporter`."""
    if settings.local_mode:
        return LocalReporter(settings.output_dir, record)
    return SupabaseReporter.from_settings(settings, **options)


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
