"""bridge.logs: JSON lines, extras, human output, and secrets never reaching the stream."""

from __future__ import annotations

import base64
import io
import json
import logging
from datetime import datetime
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.logs import Redactor, secrets_from_settings, setup_logging
from bridge.settings import Settings

SERVICE_KEY = "svc-key-0123456789abcdef"
CALLBACK_SECRET = "cb-secret-XYZ-987"
API_KEY = "worker-api-key-555"
REDIS_PASSWORD = "r3dis/pass word"  # needs URL-encoding inside REDIS_URL


@pytest.fixture()
def capture():
    """Yield a function that configures logging onto a buffer; restore the root logger after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buffers: list[io.StringIO] = []

    def _setup(json_mode: bool | None = True, secrets=(SERVICE_KEY, CALLBACK_SECRET, API_KEY)) -> io.StringIO:
        buf = io.StringIO()
        buffers.append(buf)
        setup_logging("DEBUG", json=json_mode, secrets=secrets, stream=buf)
        return buf

    yield _setup
    for handler in list(root.handlers):
        if handler not in saved[0]:
            root.removeHandler(handler)
    root.setLevel(saved[1])


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_lines_with_extras(capture):
    buf = capture(True)
    log = logging.getLogger("bridge.worker")
    log.info("job %s finished", "abc", extra={"job_id": "abc", "job_type": "video_fast", "stage": "done", "run_s": 3.25})
    log.warning("second line", extra={"model": "wan"})
    first, second = _lines(buf)
    assert first["message"] == "job abc finished"
    assert first["level"] == "INFO"
    assert first["logger"] == "bridge.worker"
    assert first["job_id"] == "abc" and first["job_type"] == "video_fast" and first["stage"] == "done"
    assert first["run_s"] == 3.25  # numbers stay numbers
    assert datetime.fromisoformat(first["time"].replace("Z", "+00:00")).tzinfo is not None
    assert second["level"] == "WARNING" and second["model"] == "wan"
    # Standard LogRecord attributes do not leak in as fields.
    assert "args" not in first and "levelno" not in first and "pathname" not in first


def test_json_is_default_when_not_a_terminal(capture):
    buf = capture(None)  # StringIO is not a TTY
    logging.getLogger("x").info("hello")
    assert _lines(buf)[0]["message"] == "hello"


def test_secrets_redacted_in_message_args_and_extras(capture):
    buf = capture(True)
    log = logging.getLogger("bridge.reporting")
    log.info(f"posting with key {SERVICE_KEY}")
    log.info("callback secret is %s and api key %r", CALLBACK_SECRET, API_KEY)
    log.info("headers", extra={"headers": {"Authorization": f"Bearer {SERVICE_KEY}"}, "note": API_KEY})
    out = buf.getvalue()
    for secret in (SERVICE_KEY, CALLBACK_SECRET, API_KEY):
        assert secret not in out
    first, second, third = _lines(buf)
    assert first["message"] == "posting with key ***"
    assert second["message"] == "callback secret is *** and api key '***'"
    assert third["headers"] == {"Authorization": "Bearer ***"}
    assert third["note"] == "***"


def test_secrets_redacted_in_exception_traceback(capture):
    buf = capture(True)
    log = logging.getLogger("bridge.worker")
    try:
        raise RuntimeError(f"upload failed for token {SERVICE_KEY} (signature sha256={'ab' * 32})")
    except RuntimeError:
        log.exception("upload error", extra={"job_id": "j1"})
    out = buf.getvalue()
    assert SERVICE_KEY not in out and "ab" * 32 not in out
    (entry,) = _lines(buf)
    assert "Traceback (most recent call last)" in entry["exception"]
    assert "RuntimeError: upload failed for token ***" in entry["exception"]
    assert "sha256=***" in entry["exception"]
    assert entry["job_id"] == "j1"


def test_human_output_redacts_too(capture):
    buf = capture(False)
    log = logging.getLogger("bridge.api")
    log.info("key=%s", API_KEY, extra={"job_id": "j2"})
    try:
        raise ValueError(f"bad {CALLBACK_SECRET}")
    except ValueError:
        log.exception("failed")
    out = buf.getvalue()
    assert "bridge.api" in out and "job_id=j2" in out
    assert "ValueError: bad ***" in out
    assert API_KEY not in out and CALLBACK_SECRET not in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.splitlines()[0])


def test_generic_patterns_without_known_secrets():
    redact = Redactor()
    assert redact("Authorization: Bearer abc.def-ghi_123") == "Authorization: Bearer ***"
    assert redact("X-Callback-Signature: sha256=" + "0f" * 32) == "X-Callback-Signature: sha256=***"
    assert redact("redis://:hunter22@redis.example:6379/0") == "redis://:***@redis.example:6379/0"
    assert redact("rediss://default:pw1234@h:6380") == "rediss://default:***@h:6380"
    assert redact("GET https://x/y?key=abcd1234&b=2") == "GET https://x/y?key=***&b=2"
    assert redact("https://x/y?a=1&token=zzz") == "https://x/y?a=1&token=***"
    assert redact("connect password=s3cr3t host=db") == "connect password=*** host=db"
    assert redact("{'apikey': 'sb_publishable_abc'}") == "{'apikey': '***'}"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2lnbmF0dXJlX2hlcmU"
    assert redact(f"key {jwt} end") == "key *** end"
    assert redact("sb_secret_AbC123_xyz") == "***"
    # Ordinary text is left alone.
    assert redact("loaded model wan in 3.2 s (cache key hit)") == "loaded model wan in 3.2 s (cache key hit)"


def test_secrets_from_settings_includes_redis_password():
    settings = Settings(
        redis_url=f"redis://default:{REDIS_PASSWORD.replace('/', '%2F').replace(' ', '%20')}@h:6379/0",
        supabase_url="https://proj.supabase.co",
        supabase_service_key=SERVICE_KEY,
        job_callback_secret=CALLBACK_SECRET,
        worker_api_key=API_KEY,
    )
    found = secrets_from_settings(settings)
    assert {SERVICE_KEY, CALLBACK_SECRET, API_KEY} <= set(found)
    redact = Redactor(found)
    # Both the encoded form (as in the URL) and the decoded password are masked.
    assert REDIS_PASSWORD not in redact(f"auth failed with {REDIS_PASSWORD}")
    assert "r3dis%2Fpass%20word" not in redact("url redis://default:r3dis%2Fpass%20word@h:6379/0 down")
    assert redact(f"x {REDIS_PASSWORD} y") == "x *** y"


def test_setup_twice_replaces_handler(capture):
    first = capture(True)
    second = capture(True)
    logging.getLogger("y").info("once")
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


# --------------------------------------------------------------------------- every printed form
_SPECIAL = "".join(chr(c) for c in range(0x21, 0x7F)) + " \t\\\"'!$%&*()[]{}<>|;:,.?/~`^=+-_@#é€😀\u0000\u001f"


def _printed_forms(secret: str) -> list[str]:
    """What code may hand the logger when it prints ``secret`` (or a header or URL holding it)."""
    basic = base64.b64encode(f"user:{secret}".encode()).decode()
    return [
        secret,
        f"key {secret} end",
        repr(secret),
        repr({"Authorization": f"Bearer {secret}", "x": "it's \"quoted\""}),
        json.dumps(secret),
        json.dumps({"payload": json.dumps({"key": secret})}),
        json.dumps(secret, ensure_ascii=False),
        repr(json.dumps(secret)),
        repr(secret.encode("utf-8", "surrogatepass")),
        quote(secret, safe=""),
        quote_plus(secret),
        f"redis://:{quote(secret, safe='')}@redis:6379/0",
        f"Authorization: Bearer {secret}",
        f"Authorization: Basic {basic}",
        f"https://bucket.s3.amazonaws.com/a.png?X-Amz-Signature={quote(secret, safe='')}&X-Amz-Expires=60",
    ]


@settings(max_examples=150, deadline=None)
@given(secret=st.text(alphabet=_SPECIAL, min_size=8, max_size=40))
def test_a_secret_never_reaches_the_log_in_any_printed_form(secret):
    """Random secrets made of every special character, logged in every form above (as the message,
    as an argument, as an extra field, inside an exception), never appear in a JSON log line,
    neither as given nor in the form it was printed in."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    buf = io.StringIO()
    try:
        setup_logging("DEBUG", json=True, secrets=[secret], stream=buf)
        log = logging.getLogger("bridge.test")
        forms = _printed_forms(secret)
        for form in forms:
            log.info(form)
            log.info("header %s", form, extra={"header": form})
            try:
                raise ValueError(form)
            except ValueError:
                log.exception("failed")
    finally:
        for handler in list(root.handlers):
            if handler not in saved[0]:
                root.removeHandler(handler)
        root.setLevel(saved[1])
    text = "\n".join(json.dumps(line, ensure_ascii=False) + repr(line) for line in _lines(buf))
    decoded = "\n".join(str(value) for line in _lines(buf) for value in line.values())
    basic = base64.b64encode(f"user:{secret}".encode()).decode()
    for needle in {secret, *_printed_forms(secret)[2:10], quote(secret, safe=""), basic}:
        assert needle not in decoded, needle
    assert secret not in text
