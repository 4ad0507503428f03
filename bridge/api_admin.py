"""Operator routes of the HTTP API (behind the API key like everything else).

- ``POST /admin`` ``{action, ...}``: a small, safe set of utilities: ``dead_letters`` (recent
  entries, newest first, secrets redacted), ``requeue_dead_letter`` (``index``: 0 is the oldest,
  -1 the newest; optional ``job_id`` must match), ``queue_depths``, ``templates_reload``
  (validate the data files on disk now and report them).
- ``POST /emergency/operation`` ``{operation, keep}``: ``status``, ``force_unload_all_except``
  (``keep``: model names; requests in flight are cancelled after :data:`FORCE_DRAIN_S`),
  ``force_cleanup`` (unload every idle model, collect garbage).
- ``GET /debug/env``: the settings with every secret redacted (the old worker's returned the
  service key and every token); never the raw environment.

Redaction: a ``SecretStr`` setting and any value under a secret-looking name (key, secret, token,
password, ...) becomes ``***redacted***``; a URL keeps its scheme, host, port and path but not its
password (``redis://:***redacted***@host:6379/0``) nor secret-looking query values; and any
configured secret value found anywhere else in an answer is replaced too.
"""

from __future__ import annotations

import gc
import json
import logging
import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from bridge.api_common import ApiError, data_source, public_snapshot, runtime_of
from bridge.api_types import ApiRuntime
from bridge.jobs import Model, peek_id
from bridge.limits import WholeNumber
from bridge.prompt_data import DataFileError, get_data, load_data
from bridge.residency import ResidencyError

log = logging.getLogger(__name__)
router = APIRouter()

REDACTED = "***redacted***"
#: Seconds ``force_unload_all_except`` lets requests in flight finish before cancelling them.
FORCE_DRAIN_S = 10.0
_SECRET_NAME = re.compile(r"key|secret|token|passw|pwd|credential|auth|signature|cookie|session", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^/\s:@]*:)[^@\s/]+@", re.IGNORECASE)
_QUERY_SECRET = re.compile(r"(?P<head>[?&][^=&\s#\"']*(?:key|secret|token|passw|sig|auth|credential)[^=&\s#\"']*=)"
                           r"[^&\s#\"']+", re.IGNORECASE)


# ----------------------------------------------------------------------------- redaction
class _Redactor:
    """Redacts answers for one settings object: known secret values, URL passwords, secret-named
    fields and secret-looking query parameters."""

    def __init__(self, settings: Any) -> None:
        values = []
        for name in type(settings).model_fields:
            value = getattr(settings, name)
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
                values.extend([value, *_url_credentials(value)])
            elif isinstance(value, str) and _SECRET_NAME.search(name):
                values.append(value)
        self._secrets = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)

    def text(self, text: str) -> str:
        """``text`` with every secret value, URL password and secret query value replaced."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}@", text)
        return _QUERY_SECRET.sub(lambda m: f"{m['head']}{REDACTED}", text)

    def value(self, value: Any, name: str = "") -> Any:
        """A JSON-ready copy of ``value`` (settings field or payload part) with secrets redacted."""
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, SecretStr):
            return self._url(value.get_secret_value())
        if name and _SECRET_NAME.search(name):
            return REDACTED
        if isinstance(value, dict):
            return {str(k): self.value(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple, set)):
            return [self.value(v) for v in value]
        return self.text(str(value))

    def _url(self, secret: str) -> str:
        """A secret that is a URL (``REDIS_URL``) without its password and query; else redacted."""
        try:
            parts = urlsplit(secret)
            port = parts.port
        except ValueError:
            return REDACTED
        if not (parts.scheme and parts.hostname):
            return REDACTED
        auth = f"{parts.username or ''}:{REDACTED}@" if parts.password else (f"{REDACTED}@" if parts.username else "")
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        netloc = f"{auth}{host}" + (f":{port}" if port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "", ""))


def _url_credentials(value: str) -> list[str]:
    """The password of a URL, or its user name when it has no password (a bare token)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return []
    if parts.password:
        return [parts.password]
    return [parts.username] if parts.username else []


def settings_view(settings: Any) -> dict[str, Any]:
    """Every setting by name (plus ``local_mode``), secrets redacted; nothing from the raw environment."""
    redactor = _Redactor(settings)
    view = {name: redactor.value(getattr(settings, name), name) for name in type(settings).model_fields}
    view["local_mode"] = settings.local_mode
    return view


@router.get("/debug/env")
async def debug_env(request: Request) -> dict[str, Any]:
    """The worker's configuration as it was read, every secret shown as ``***redacted***``."""
    settings = runtime_of(request).settings
    return {"success": True, "settings": settings_view(settings),
            "note": "secrets are redacted; the raw environment is not shown"}


# ----------------------------------------------------------------------------- /admin
class AdminRequest(BaseModel):
    """``POST /admin``. ``limit``: entries ``dead_letters`` lists; ``index``/``job_id``: the entry
    ``requeue_dead_letter`` moves."""

    model_config = ConfigDict(extra="ignore")

    action: Literal["dead_letters", "requeue_dead_letter", "queue_depths", "templates_reload"]
    limit: WholeNumber = Field(20, ge=1, le=200)
    index: WholeNumber | None = None
    job_id: str | None = Field(None, min_length=1, max_length=128)


def _dead_entry(entry: dict[str, Any], index: int, redactor: _Redactor) -> dict[str, Any]:
    """One dead-letter entry for an answer: its payload parsed when it is JSON, secrets redacted."""
    raw = entry.get("raw")
    if isinstance(raw, str):
        try:
            payload: Any = redactor.value(json.loads(raw))
        except ValueError:
            payload = redactor.text(raw[:4000])
    else:
        payload = f"binary payload ({len(entry.get('raw_base64', '')) * 3 // 4} bytes)"
    return {
        "index": index,
        "job_id": peek_id(raw) if isinstance(raw, str) else None,
        "queue": entry.get("queue"),
        "reason": redactor.text(str(entry.get("reason", ""))),
        "worker_id": entry.get("worker_id"),
        "time": entry.get("time"),
        "payload": payload,
    }


async def _dead_letters(runtime: ApiRuntime, limit: int) -> dict[str, Any]:
    entries = await runtime.queue.dead_letters(-limit, -1)
    redactor = _Redactor(runtime.settings)
    count = len(entries)
    listed = [_dead_entry(entry, i - count, redactor) for i, entry in enumerate(entries)]
    return {"success": True, "action": "dead_letters", "entries": listed[::-1],
            "note": "newest first; index -1 is the newest (0 the oldest)"}


async def _requeue(runtime: ApiRuntime, index: int | None, job_id: str | None) -> dict[str, Any]:
    if index is None:
        raise ApiError(422, "index: required for requeue_dead_letter (0 is the oldest entry, -1 the newest)",
                       param="index")
    queue = runtime.queue
    if job_id is not None:
        [current] = await queue.dead_letters(index, index) or [None]
        if current is None or peek_id(current.get("raw") or "") != job_id:
            raise ApiError(409, f"dead-letter entry {index} is not job {job_id!r} (the list changed?)",
                           type="conflict", param="job_id")
    try:
        entry = await queue.requeue_dead_letter(index)
    except ValueError as exc:
        raise ApiError(409, str(exc), type="conflict", param="index") from None
    if entry is None:
        raise ApiError(404, f"no dead-letter entry at index {index}", type="not_found", param="index")
    moved_id = peek_id(entry["raw"])
    if moved_id:
        await queue.set_state(moved_id, status="queued", progress=0, error=None, queue=entry["queue"],
                              source="requeued")
    return {"success": True, "action": "requeue_dead_letter", "index": index, "job_id": moved_id,
            "queue": entry["queue"], "message": f"moved back to the end of {entry['queue']}"}


def _templates_reload(runtime: ApiRuntime) -> dict[str, Any]:
    data_dir = runtime.settings.data_dir
    try:
        load_data(data_dir)  # validate what is on disk now; get_data() keeps the last good copy
    except DataFileError as exc:
        log.warning("templates_reload: %s", exc)
        # The file and entry by name; the folder (a path on this machine) as the setting's name.
        problem = str(exc).replace(str(data_dir).rstrip("/"), "DATA_DIR")
        raise ApiError(409, f"{problem}; the last good copy stays in use", type="data_file_error") from None
    data = get_data(data_dir)
    return {"success": True, "action": "templates_reload", "source": data_source(data),
            "templates": sorted(data.templates.templates),
            "message": "data files are valid and in use (they are also re-read whenever they change)"}


@router.post("/admin")
async def admin(request: Request, body: AdminRequest) -> dict[str, Any]:
    """Operator utilities; see the module docstring for the actions."""
    runtime = runtime_of(request)
    if body.action == "dead_letters":
        return await _dead_letters(runtime, body.limit)
    if body.action == "requeue_dead_letter":
        return await _requeue(runtime, body.index, body.job_id)
    if body.action == "queue_depths":
        return {"success": True, "action": "queue_depths", "queues": await runtime.queue.queue_depths()}
    return _templates_reload(runtime)


# ----------------------------------------------------------------------------- emergency
class EmergencyRequest(BaseModel):
    """``POST /emergency/operation``; ``keep`` is required by ``force_unload_all_except``."""

    model_config = ConfigDict(extra="ignore")

    operation: Literal["status", "force_unload_all_except", "force_cleanup"]
    keep: list[Model] | None = None


async def _unload_each(residency: Any, names: list[str], deadline_s: float | None) -> tuple[list[str], dict[str, str]]:
    unloaded, failed = [], {}
    for name in names:
        try:
            if await residency.unload(name, deadline_s):
                unloaded.append(name)
        except ResidencyError as exc:
            log.warning("emergency unload of %s failed: %s", name, exc)
            failed[name] = exc.public
    return unloaded, failed


@router.post("/emergency/operation")
async def emergency_operation(request: Request, body: EmergencyRequest) -> dict[str, Any]:
    """``status``: the residency report. ``force_unload_all_except``: unload every resident
    model not in ``keep`` (in-flight requests are cancelled after :data:`FORCE_DRAIN_S`).
    ``force_cleanup``: unload every idle resident model and collect garbage."""
    residency = runtime_of(request).residency
    answer: dict[str, Any] = {"success": True, "operation": body.operation}
    if body.operation == "force_unload_all_except":
        if body.keep is None:
            raise ApiError(422, "keep: required for force_unload_all_except (a list of model names, may be empty)",
                           param="keep")
        report = residency.report().models
        targets = [n for n, m in report.items() if m.state == "ready" and n not in body.keep]
        answer["kept"] = sorted(set(body.keep))
        answer["unloaded"], answer["failed"] = await _unload_each(residency, targets, FORCE_DRAIN_S)
    elif body.operation == "force_cleanup":
        report = residency.report().models
        idle = [n for n, m in report.items() if m.state == "ready" and m.in_flight == 0]
        answer["unloaded"], answer["failed"] = await _unload_each(residency, idle, None)
        answer["gc_collected"] = gc.collect()
    answer["success"] = not answer.get("failed")
    answer["memory"] = public_snapshot(residency.snapshot())
    return answer
