"""Logging for the bridge: JSON lines in production, Rich in a terminal, secrets always redacted.

``setup_logging(level, json=None, secrets=...)`` configures the root logger once per process:

- JSON (one object per line: ``time`` ISO 8601 UTC, ``level``, ``logger``, ``message``, then every
  ``extra=`` field such as ``job_id``, ``job_type``, ``stage``, ``model``, ``duration_s``; an
  ``exception`` field holds the traceback) when the stream is not a terminal, or when ``json=True``;
- human-readable lines through Rich's handler when it is a terminal (or ``json=False``).

Either way a :class:`RedactingFilter` runs first: it replaces every configured secret (see
:func:`secrets_from_settings`) in the message, its arguments, ``extra`` fields, exception and stack
text with ``***``, and also masks generic shapes of credentials: ``Bearer <token>``,
``sha256=<signature>``, passwords in URLs (``redis://:pw@host``), ``password=``/``key=``/``token=``
query parameters, JWTs and Supabase ``sb_secret_`` keys.

Log with fields, not formatted strings, so the JSON stays queryable::

    log.info("job finished", extra={"job_id": job.id, "job_type": job.type, "stage": "done",
                                     "run_s": 3.2})
"""

from __future__ import annotations

import json as _json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any, TextIO
from urllib.parse import quote, quote_plus, unquote, unquote_plus, urlsplit

from pydantic import SecretStr

REDACTED = "***"
# A "secret" this short cannot be one worth hiding, and masking it would mangle every line.
MIN_SECRET_LENGTH = 4

_GENERIC_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer <token> (any characters up to a space, quote, comma or bracket)
    (re.compile(r"(?i)\b(Bearer\s+)[^\s\"',;}\]\\]+"), r"\1" + REDACTED),
    # Authorization: Basic <base64 of user:password>
    (re.compile(r"(?i)\b(Basic\s+)[A-Za-z0-9+/=_\-]{4,}"), r"\1" + REDACTED),
    # X-Callback-Signature: sha256=<hex>
    (re.compile(r"(?i)\b(sha256=)[0-9a-f]{8,}"), r"\1" + REDACTED),
    # scheme://user:password@host
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^/\s:@]*:)[^/\s@]+@"), r"\1" + REDACTED + "@"),
    # ?key=...&token=... in URLs
    (
        re.compile(
            r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token|access_token|refresh_token|"
            r"api_key|apikey|key|sig|signature|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s#\"']+"
        ),
        r"\1" + REDACTED,
    ),
    # password=... anywhere (connection strings, option dumps)
    (re.compile(r"(?i)\b((?:password|passwd)=)[^&\s,;\"']+"), r"\1" + REDACTED),
    # apikey: ... / 'triton-api-key': '...' (headers and their reprs)
    (
        re.compile(r"(?i)(\b(?:apikey|api[-_]key|x-api-key|triton-api-key)[\"']?\s*[:=]\s*[\"']?)[^\s\"',}&]+"),
        r"\1" + REDACTED,
    ),
    # JWTs (Supabase legacy keys are JWTs) and new-style Supabase secret keys
    (re.compile(r"\beyJ[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}\.[A-Za-z0-9_\-]{5,}"), REDACTED),
    (re.compile(r"\bsb_secret_[A-Za-z0-9_\-]+"), REDACTED),
)

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_HANDLER_MARK = "_gpu_worker_handler"


def secrets_from_settings(settings: Any) -> list[str]:
    """The secret values of ``settings`` (a :class:`bridge.settings.Settings`): the Supabase service
    key, the callback secret, the API keys and the password inside ``REDIS_URL``."""
    found: list[str] = []
    for name in ("supabase_service_key", "job_callback_secret", "worker_api_key", "triton_api_key"):
        value = getattr(settings, name, None)
        if value is not None:
            found.append(value.get_secret_value() if isinstance(value, SecretStr) else str(value))
    api_keys = getattr(settings, "worker_api_key", None)
    if isinstance(api_keys, SecretStr):  # WORKER_API_KEY may hold several keys: each is a secret
        found.extend(key.strip() for key in api_keys.get_secret_value().split(",") if key.strip())
    redis_url = getattr(settings, "redis_url", None)
    if redis_url is not None:
        raw = redis_url.get_secret_value() if isinstance(redis_url, SecretStr) else str(redis_url)
        password = urlsplit(raw).password
        if password:
            found.append(password)
    return found


def _repr_forms(text: str) -> set[str]:
    """``text`` as it shows inside a Python ``repr()``: quotes escaped (``\\'``) or not, depending
    on the quotes of the whole string it is part of; backslashes and control characters escaped."""
    pieces = re.split(r"(['\"])", text)
    single = "".join({"'": "\\'", '"': '"'}.get(piece) or repr(piece)[1:-1] for piece in pieces)
    plain = "".join(piece if piece in ("'", '"') else repr(piece)[1:-1] for piece in pieces)
    return {single, plain, repr(text.encode("utf-8", "surrogatepass"))[2:-1]}


def secret_forms(text: str) -> set[str]:
    """Every way the logs may print ``text``: as is, URL-encoded (a password in ``REDIS_URL``) or
    decoded, escaped by ``repr()`` or JSON, and those escaped once more (a payload or header dict
    printed inside another repr or JSON string)."""
    forms = {text, quote(text, safe=""), quote(text), quote_plus(text), unquote(text), unquote_plus(text)}
    escaped = _repr_forms(text) | {_json.dumps(text)[1:-1], _json.dumps(text, ensure_ascii=False)[1:-1]}
    for once in list(escaped):
        escaped |= _repr_forms(once) | {_json.dumps(once)[1:-1], _json.dumps(once, ensure_ascii=False)[1:-1]}
    return forms | escaped


class Redactor:
    """Replaces known secrets and credential-shaped text with ``***``."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        values: set[str] = set()
        for secret in secrets:
            if secret is None:
                continue
            text = secret.get_secret_value() if isinstance(secret, SecretStr) else str(secret)
            for variant in secret_forms(text):
                if len(variant) >= MIN_SECRET_LENGTH:
                    values.add(variant)
        # Longest first, so a secret that contains another is masked whole.
        ordered = sorted(values, key=len, reverse=True)
        self._secrets = re.compile("|".join(re.escape(v) for v in ordered)) if ordered else None

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self._secrets is not None:
            text = self._secrets.sub(REDACTED, text)
        for pattern, replacement in _GENERIC_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any) -> Any:
        """Redact strings inside ``value`` (dicts, lists and tuples walked; others kept)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(item) for item in value)
        if isinstance(value, (bytes, bytearray)):
            return self(bytes(value).decode("utf-8", "replace"))
        if value is None or isinstance(value, (bool, int, float)):
            return value
        return self(str(value))


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record in place before any formatter sees it.

    The message is rendered with its arguments and redacted (``args`` is then cleared); an
    exception becomes redacted ``exc_text`` (``exc_info`` is cleared, so no handler can render the
    raw exception again); ``stack_info`` and every ``extra`` field are redacted too.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not lose the line
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info != (None, None, None):
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key in _extra_keys(record):
            setattr(record, key, redact.value(getattr(record, key)))
        return True


def _extra_keys(record: logging.LogRecord) -> list[str]:
    return [key for key in record.__dict__ if key not in _STANDARD_ATTRS and not key.startswith("_")]


def _json_default(value: Any) -> Any:
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _extra_keys(record):
            if key not in entry:
                entry[key] = getattr(record, key)
        if record.exc_info and record.exc_info != (None, None, None) and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _json.dumps(entry, default=_json_default, ensure_ascii=False)


class _HumanFormatter(logging.Formatter):
    """``logger: message key=value ...`` (Rich adds time and level)."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.name}: {record.getMessage()}"
        extras = " ".join(f"{key}={getattr(record, key)}" for key in _extra_keys(record))
        if extras:
            text = f"{text}  {extras}"
        if record.exc_info and record.exc_info != (None, None, None) and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        return text


def _human_handler(stream: TextIO) -> logging.Handler:
    try:
        from rich.console import Console  # noqa: PLC0415 - only for terminals
        from rich.logging import RichHandler  # noqa: PLC0415
    except ImportError:  # pragma: no cover - rich is a dependency
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler
    # rich_tracebacks off: tracebacks come from the (redacted) exc_text, never the live exception.
    handler = RichHandler(
        console=Console(file=stream), show_path=False, rich_tracebacks=False, markup=False, log_time_format="%X"
    )
    handler.setFormatter(_HumanFormatter())
    return handler


def setup_logging(
    level: str | int = "INFO",
    json: bool | None = None,
    secrets: Iterable[str | SecretStr | None] = (),
    stream: TextIO | None = None,
) -> logging.Handler:
    """Configure the root logger: JSON lines unless ``stream`` (default stderr) is a terminal
    (``json`` forces either way), with secrets redacted. Calling it again replaces the handler it
    installed before. Returns the handler."""
    stream = stream if stream is not None else sys.stderr
    if json is None:
        json = not (hasattr(stream, "isatty") and stream.isatty())
    handler = logging.StreamHandler(stream) if json else _human_handler(stream)
    if json:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter(Redactor(secrets)))
    setattr(handler, _HANDLER_MARK, True)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Per-request lines of the HTTP client are noise at INFO.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
