"""A local stand-in for the Supabase project (Storage + the edge functions we call), for tests.

It runs an HTTP server on 127.0.0.1 (free port) in a background thread, records every request,
and CHECKS each against docs/APP_CONTRACT.md §4; anything off is added to :attr:`SupabaseStub.violations`
(tests assert it stays empty). It behaves like the real services where that matters: wrong keys
or a bad ``X-Callback-Signature`` get 401, a repeated upload without upsert gets 409, callbacks for
jobs already ``completed``/``cancelled`` are ignored, and unknown jobs get ``skipped: true`` when
``unknown_jobs="skip"``. It can be told to fail: :meth:`SupabaseStub.fail_next` answers an error
status, hangs, or drops the connection for the next N requests of a route.

Usage::

    with SupabaseStub() as stub:
        settings = Settings(**stub.settings_values(), output_dir=tmp_path)
        ...
        assert stub.violations == []
        assert stub.callbacks(job_id)[-1]["status"] == "completed"
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from email.parser import BytesParser
from email.policy import HTTP
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

Route = Literal["storage", "job-callback", "update-worker-url", "register-chat-worker", "rest", "other"]
FailMode = Literal["status", "hang", "close"]

STATUSES = ("processing", "completed", "failed", "cancelled")
FINAL_STATUSES = ("completed", "cancelled")  # the real function ignores callbacks after these
CALLBACK_FIELDS = ("job_id", "status", "assets", "error_message", "metadata")
IMAGE_META = ("width", "height", "format", "batch_size", "steps", "guidance_scale", "seed",
              "file_size_bytes", "asset_index", "negative_prompt_used")
VIDEO_META = ("width", "height", "format", "frame_num", "fps", "duration_seconds", "seed",
              "file_size_bytes", "asset_index")
EXTENSION_TYPES = {".png": "image/png", ".mp4": "video/mp4", ".webp": "image/webp"}
_STORAGE_RE = re.compile(r"^/storage/v1/object/(?P<bucket>[^/]+)/(?P<path>.+)$")
_SIGN_RE = re.compile(r"^/storage/v1/object/sign/(?P<bucket>[^/]+)/(?P<path>.+)$")
EXPIRED_JWT = {"statusCode": "400", "error": "InvalidJWT", "message": '"exp" claim timestamp check failed'}
_FILE_RE = re.compile(r"^(\d+\.png|0\.mp4|\d+\.thumb\.webp)$")
_FUNCTION_ROUTES = {
    "/functions/v1/job-callback": "job-callback",
    "/functions/v1/update-worker-url": "update-worker-url",
    "/functions/v1/register-chat-worker": "register-chat-worker",
}


@dataclass
class RecordedRequest:
    """One request as the stub saw it. ``headers`` keys are lower-case."""

    method: str
    path: str
    route: Route
    headers: dict[str, str]
    body: bytes
    query: str = ""
    stored_type: str = ""  # an upload: the Content-Type the object is stored with (multipart: the file part's)
    status: int | None = None  # None: no answer (injected hang / close)
    outcome: str = ""  # stored, applied, ignored, skipped, rejected, injected-<mode>, recorded
    violations: list[str] = field(default_factory=list)
    at: float = field(default_factory=time.monotonic)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class StoredObject:
    path: str  # inside the bucket
    data: bytes
    content_type: str
    writes: int = 1


@dataclass
class _Failure:
    mode: FailMode
    remaining: int
    status: int
    hang_s: float


class SupabaseStub:
    """The fake Supabase. Thread-safe; start with :meth:`start` or use as a context manager."""

    def __init__(
        self,
        *,
        service_key: str = "stub-service-key-7f3a9c",
        callback_secret: str = "stub-callback-secret-51d2e8",
        bucket: str = "workspace-temp",
        unknown_jobs: Literal["accept", "skip"] = "accept",
    ) -> None:
        self.service_key = service_key
        self.callback_secret = callback_secret
        self.bucket = bucket
        self.unknown_jobs = unknown_jobs
        self.requests: list[RecordedRequest] = []
        self.violations: list[str] = []
        self.objects: dict[str, StoredObject] = {}
        self.jobs: dict[str, str] = {}
        self.library: dict[tuple[str, str], StoredObject] = {}  # (bucket, path): reference objects
        self._jwt_secret = f"stub-jwt-{id(self)}".encode()
        self._failures: dict[str, list[_Failure]] = {}
        self._holds: dict[str, threading.Barrier] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- life cycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("SupabaseStub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "SupabaseStub":
        handler = type("_BoundHandler", (_Handler,), {"stub": self})
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._stopping.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="supabase-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases hanging handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "SupabaseStub":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def settings_values(self) -> dict[str, Any]:
        """Keyword arguments for ``Settings`` that point at this stub."""
        return {
            "supabase_url": self.url,
            "supabase_service_key": self.service_key,
            "job_callback_secret": self.callback_secret,
            "storage_bucket": self.bucket,
        }

    # --- steering ---------------------------------------------------------------------------

    def fail_next(self, route: Route, count: int = 1, *, mode: FailMode = "status", status: int = 500,
                  hang_s: float = 10.0) -> None:
        """Make the next ``count`` requests of ``route`` fail: answer ``status`` (mode "status"),
        answer nothing for ``hang_s`` then drop the connection ("hang"), or drop it at once ("close")."""
        with self._lock:
            self._failures.setdefault(route, []).append(_Failure(mode, count, status, hang_s))

    def hold(self, route: Route, count: int, timeout_s: float = 5.0) -> None:
        """Hold each request of ``route`` until ``count`` of them wait at once, then answer them
        all: only a client that sends them concurrently gets through. Held longer than
        ``timeout_s``, they (and every later one) get 503 with outcome ``held-alone``."""
        with self._lock:
            self._holds[route] = threading.Barrier(count, timeout=timeout_s)

    def clear_failures(self) -> None:
        """Forget failures still pending from :meth:`fail_next`."""
        with self._lock:
            self._failures.clear()

    def set_job(self, job_id: str, status: str = "queued") -> None:
        with self._lock:
            self.jobs[job_id] = status

    def put_object(self, bucket: str, path: str, data: bytes, content_type: str = "image/png") -> None:
        """Put a reference object (e.g. ``user-library``, ``{user_id}/x.png``) the way the app's
        uploads do; it is served to the service key and through signed URLs."""
        with self._lock:
            self.library[(bucket, path)] = StoredObject(path, data, content_type)

    def sign_url(self, bucket: str, path: str, expires_in_s: float) -> str:
        """A signed URL of ``bucket/path`` as Storage makes it (negative ``expires_in_s``: expired)."""
        return f"{self.url}/storage/v1{self._signed_path(bucket, path, expires_in_s)}"

    def _signed_path(self, bucket: str, path: str, expires_in_s: float) -> str:
        claims = {"url": f"{bucket}/{path}", "iat": int(time.time()), "exp": int(time.time() + expires_in_s)}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        signature = hmac.new(self._jwt_secret, payload.encode(), hashlib.sha256).hexdigest()
        return f"/object/sign/{bucket}/{path}?token={payload}.{signature}"

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.violations.clear()
            self.objects.clear()
            self.jobs.clear()
            self._failures.clear()
            self._holds.clear()

    # --- reading what happened --------------------------------------------------------------

    def job_status(self, job_id: str) -> str | None:
        with self._lock:
            return self.jobs.get(job_id)

    def requests_for(self, route: Route) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests if r.route == route]

    def callbacks(self, job_id: str | None = None, *, outcome: str | None = "applied") -> list[dict[str, Any]]:
        """Bodies of callbacks (for ``job_id`` if given) with that outcome (None: any), in order."""
        bodies = []
        for request in self.requests_for("job-callback"):
            if outcome is not None and request.outcome != outcome:
                continue
            try:
                body = request.json()
            except ValueError:
                continue
            if job_id is None or (isinstance(body, dict) and body.get("job_id") == job_id):
                bodies.append(body)
        return bodies

    def uploads(self) -> list[RecordedRequest]:
        """Storage requests that stored an object, in order."""
        return [r for r in self.requests_for("storage") if r.outcome == "stored"]

    def object(self, path: str) -> StoredObject | None:
        """The object stored at ``path`` (inside the bucket), if any."""
        with self._lock:
            return self.objects.get(path)

    def function_calls(self, route: Route) -> list[Any]:
        """JSON bodies received by ``update-worker-url`` / ``register-chat-worker``."""
        return [r.json() for r in self.requests_for(route) if r.outcome == "recorded"]

    # --- request handling (runs in the server's threads) -------------------------------------

    def _take_failure(self, route: str) -> _Failure | None:
        with self._lock:
            queue = self._failures.get(route) or []
            while queue and queue[0].remaining <= 0:
                queue.pop(0)
            if not queue:
                return None
            queue[0].remaining -= 1
            return queue[0]

    def _violate(self, request: RecordedRequest, message: str) -> None:
        request.violations.append(message)
        with self._lock:
            self.violations.append(f"{request.method} {request.path}: {message}")

    def _check_bearer(self, request: RecordedRequest, *, apikey: bool) -> bool:
        ok = request.headers.get("authorization") == f"Bearer {self.service_key}"
        if not ok:
            self._violate(request, "Authorization is not 'Bearer <service key>'")
        if apikey and request.headers.get("apikey") != self.service_key:
            self._violate(request, "apikey header is not the service key")
            ok = False
        return ok

    def handle(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        """Check and apply one request; return (status, JSON answer)."""
        if request.method == "GET" and request.path == f"/storage/v1/bucket/{self.bucket}":
            # The start-up check (bridge/doctor.py) reads the bucket with the service key.
            if not self._check_bearer(request, apikey=True):
                return 401, {"statusCode": "401", "error": "Unauthorized", "message": "invalid key"}
            request.outcome = "bucket"
            return 200, {"id": self.bucket, "name": self.bucket, "public": False}
        if request.route == "rest":
            return self._handle_rest(request)
        if request.method == "GET" and request.route == "storage":
            return self._handle_download(request)
        if request.method == "POST" and _SIGN_RE.match(request.path):
            return self._handle_sign(request)
        if request.method != "POST":
            self._violate(request, f"unexpected method {request.method}")
            return 405, {"error": "method not allowed"}
        if request.route == "storage":
            return self._handle_storage(request)
        if request.route == "job-callback":
            return self._handle_callback(request)
        if request.route in ("update-worker-url", "register-chat-worker"):
            if not self._check_bearer(request, apikey=False):
                return 401, {"error": "unauthorized"}
            try:
                request.json()
            except ValueError:
                self._violate(request, "body is not JSON")
                return 400, {"error": "invalid JSON"}
            request.outcome = "recorded"
            return 200, {"success": True}
        self._violate(request, "unknown route")
        return 404, {"error": "not found"}

    def _keyed_object(self, request: RecordedRequest) -> tuple[re.Match | None, tuple[int, dict[str, Any]] | None]:
        """The object path a request with the service key names, or the answer that refuses it."""
        match = _STORAGE_RE.match(request.path)
        if not match:
            self._violate(request, "not a storage object path")
            return None, (400, {"error": "bad path"})
        if not self._check_bearer(request, apikey=True):
            return None, (401, {"statusCode": "401", "error": "Unauthorized", "message": "invalid key"})
        return match, None

    def _handle_storage(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        match, refusal = self._keyed_object(request)
        if refusal is not None:
            return refusal
        if match["bucket"] != self.bucket:
            self._violate(request, f"bucket {match['bucket']!r} is not {self.bucket!r}")
            return 404, {"statusCode": "404", "error": "Bucket not found"}
        path = unquote(match["path"])
        parts = path.split("/")
        if len(parts) != 3 or not all(parts) or not _FILE_RE.match(parts[2]):
            self._violate(request, f"object path {path!r} is not {{user_id}}/{{job_id}}/{{file}}")
            return 400, {"error": "bad object path"}
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = request.body
        if content_type == "multipart/form-data":  # supabase-py: the file is the form's "file" part
            part = _form_file(request.headers["content-type"], request.body)
            if part is None:
                self._violate(request, "multipart upload without a 'file' part")
                return 400, {"statusCode": "400", "error": "InvalidRequest", "message": "no file"}
            content_type, body = part
        request.stored_type = content_type
        expected = EXTENSION_TYPES["." + parts[2].rsplit(".", 1)[1]]
        if content_type != expected:
            self._violate(request, f"Content-Type {content_type or '(none)'!r} for {parts[2]} (expected {expected})")
            return 400, {"statusCode": "415", "error": "invalid_mime_type", "message": f"mime type {content_type} is not supported"}
        if not _looks_like(expected, body):
            self._violate(request, f"body of {parts[2]} does not look like {expected}")
        upsert = request.headers.get("x-upsert", "").lower() == "true"
        if not upsert:
            self._violate(request, "x-upsert is not 'true'")
        with self._lock:
            existing = self.objects.get(path)
            if existing is not None and not upsert:
                request.outcome = "rejected"
                return 409, {"statusCode": "409", "error": "Duplicate", "message": "The resource already exists"}
            writes = existing.writes + 1 if existing else 1
            self.objects[path] = StoredObject(path, body, content_type, writes)
        request.outcome = "stored"
        return 200, {"Key": f"{self.bucket}/{path}", "Id": f"stub-{abs(hash(path)) % 10**8}"}

    def _library_object(self, bucket: str, path: str) -> StoredObject | None:
        with self._lock:
            found = self.library.get((bucket, path))
            if found is None and bucket == self.bucket:
                found = self.objects.get(path)
            return found

    def _handle_download(self, request: RecordedRequest) -> tuple[int, Any]:
        signed = _SIGN_RE.match(request.path)
        if signed:  # a signed URL: the token is the authority, no key
            bucket, path = signed["bucket"], unquote(signed["path"])
            token = (parse_qs(request.query).get("token") or [""])[0]
            payload, _, signature = token.partition(".")
            good = hmac.new(self._jwt_secret, payload.encode(), hashlib.sha256).hexdigest()
            if not payload or not hmac.compare_digest(signature, good):
                request.outcome = "rejected"
                return 400, {"statusCode": "400", "error": "InvalidJWT", "message": "invalid signature"}
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            if claims.get("url") != f"{bucket}/{path}":
                request.outcome = "rejected"
                return 400, {"statusCode": "400", "error": "InvalidSignature", "message": "The url do not match the signature"}
            if claims["exp"] < time.time():
                request.outcome = "expired"
                return 400, dict(EXPIRED_JWT)
        else:
            match, refusal = self._keyed_object(request)
            if refusal is not None:
                return refusal
            bucket, path = match["bucket"], unquote(match["path"])
        found = self._library_object(bucket, path)
        if found is None:
            request.outcome = "missing"
            return 400, {"statusCode": "404", "error": "not_found", "message": "Object not found"}
        request.outcome = "served"
        return 200, _Raw(found.data, found.content_type)

    def _handle_sign(self, request: RecordedRequest) -> tuple[int, Any]:
        match = _SIGN_RE.match(request.path)
        assert match is not None
        if not self._check_bearer(request, apikey=True):
            return 401, {"statusCode": "401", "error": "Unauthorized", "message": "invalid key"}
        bucket, path = match["bucket"], unquote(match["path"])
        try:
            expires = float(request.json().get("expiresIn"))
        except (ValueError, TypeError, AttributeError):
            return 400, {"statusCode": "400", "error": "InvalidRequest", "message": "expiresIn required"}
        if self._library_object(bucket, path) is None:
            request.outcome = "missing"
            return 400, {"statusCode": "404", "error": "not_found", "message": "Object not found"}
        request.outcome = "signed"
        return 200, {"signedURL": self._signed_path(bucket, path, expires)}

    def _handle_rest(self, request: RecordedRequest) -> tuple[int, Any]:
        if request.method != "GET" or request.path != "/rest/v1/jobs":
            self._violate(request, f"unexpected REST request {request.method} {request.path}")
            return 404, {"message": "not found"}
        if not self._check_bearer(request, apikey=True):
            return 401, {"message": "Invalid API key"}
        query = parse_qs(request.query)
        job_id = (query.get("id") or [""])[0].removeprefix("eq.")
        if (query.get("select") or [""])[0] != "status" or not job_id:
            self._violate(request, f"jobs read is not id=eq.<id>&select=status: {request.query!r}")
        request.outcome = "read"
        status = self.job_status(job_id)
        return 200, [] if status is None else [{"status": status}]

    def _handle_callback(self, request: RecordedRequest) -> tuple[int, dict[str, Any]]:
        if not self._check_bearer(request, apikey=False):
            request.outcome = "rejected"
            return 401, {"error": "unauthorized"}
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            self._violate(request, "Content-Type is not application/json")
        expected = "sha256=" + hmac.new(self.callback_secret.encode(), request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(request.headers.get("x-callback-signature", ""), expected):
            self._violate(request, "X-Callback-Signature missing or wrong for the body bytes")
            request.outcome = "rejected"
            return 401, {"error": "invalid signature"}
        try:
            body = request.json()
        except ValueError:
            self._violate(request, "body is not JSON")
            request.outcome = "rejected"
            return 400, {"error": "invalid JSON"}
        problems = self._callback_problems(body)
        for problem in problems:
            self._violate(request, problem)
        if not isinstance(body, dict) or any(name not in body for name in CALLBACK_FIELDS) \
                or body.get("status") not in STATUSES:
            request.outcome = "rejected"
            return 400, {"error": "invalid callback", "problems": problems}
        job_id, status = body["job_id"], body["status"]
        with self._lock:
            current = self.jobs.get(job_id)
            if current is None and self.unknown_jobs == "skip":
                request.outcome = "skipped"
                return 200, {"success": True, "skipped": True, "reason": "job not found"}
            if current in FINAL_STATUSES:
                request.outcome = "ignored"
                return 200, {"success": True, "skipped": True, "reason": f"job already {current}"}
            self.jobs[job_id] = status
        request.outcome = "applied"
        return 200, {"success": True, "job_id": job_id, "status": status}

    def _callback_problems(self, body: Any) -> list[str]:
        """Contract problems of a callback body (wrong shapes, missing asset fields, ...)."""
        if not isinstance(body, dict):
            return ["body is not a JSON object"]
        problems = [f"field {name!r} missing" for name in CALLBACK_FIELDS if name not in body]
        status = body.get("status")
        if status not in STATUSES:
            problems.append(f"status {status!r} not in {STATUSES}")
        metadata = body.get("metadata")
        if not isinstance(metadata, dict):
            problems.append("metadata is not an object")
            metadata = {}
        if status == "processing" and "progress" in metadata:
            progress = metadata["progress"]
            if not isinstance(progress, (int, float)) or not 0 <= progress <= 100:
                problems.append(f"metadata.progress {progress!r} not in 0-100")
        if status == "failed" and not (isinstance(body.get("error_message"), str) and body["error_message"]):
            problems.append("failed callback without an error_message")
        if status == "completed":
            assets = body.get("assets")
            text_result = isinstance(body.get("metadata"), dict) and isinstance(body["metadata"].get("response"), str)
            if not isinstance(assets, list) or (not assets and not text_result):
                problems.append("completed callback without assets (or, for a chat job, metadata.response)")
            else:
                for index, asset in enumerate(assets):
                    problems.extend(f"asset {index}: {p}" for p in self._asset_problems(asset))
        return problems

    def _asset_problems(self, asset: Any) -> list[str]:
        if not isinstance(asset, dict):
            return ["not an object"]
        problems = []
        kind = asset.get("type")
        if kind not in ("image", "video"):
            problems.append(f"type {kind!r}")
        for key in ("url", "thumbnail_url"):
            value = asset.get(key)
            if not isinstance(value, str) or not value:
                problems.append(f"{key} missing")
            elif value.startswith((self.bucket + "/", "/", "http")):
                problems.append(f"{key} {value!r} is not a path inside the bucket")
            elif self.object(value) is None:
                problems.append(f"{key} {value!r} was never uploaded")
        metadata = asset.get("metadata")
        if not isinstance(metadata, dict):
            return problems + ["metadata missing"]
        required = IMAGE_META if kind == "image" else VIDEO_META
        missing = [key for key in required if key not in metadata]
        if missing:
            problems.append(f"metadata lacks {missing}")
        expected_format = "png" if kind == "image" else "mp4"
        if metadata.get("format") != expected_format:
            problems.append(f"metadata.format {metadata.get('format')!r} (expected {expected_format})")
        return problems


@dataclass
class _Raw:
    """An answer that is not JSON (a downloaded object)."""

    data: bytes
    content_type: str


def _form_file(content_type: str, body: bytes) -> tuple[str, bytes] | None:
    """The ``file`` part of a multipart/form-data body: (its content type, its bytes)."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "file":
            return part.get_content_type().lower(), part.get_payload(decode=True) or b""
    return None


def _looks_like(content_type: str, data: bytes) -> bool:
    if content_type == "image/png":
        return data.startswith(b"\x89PNG\r\n\x1a\n")
    if content_type == "image/webp":
        return data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    if content_type == "video/mp4":
        return data[4:8] == b"ftyp"
    return False


class _QuietServer(ThreadingHTTPServer):
    """A client that drops its connection (a killed worker) is normal here, not a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys  # noqa: PLC0415

        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, applies injected failures, hands it to the stub, writes the answer."""

    stub: SupabaseStub
    protocol_version = "HTTP/1.1"
    timeout = 30  # an idle keep-alive connection frees its thread eventually

    def setup(self) -> None:
        super().setup()
        # An answer is written as headers, then body: without TCP_NODELAY, Nagle's algorithm holds
        # the body until the client's delayed ACK of the headers (~40 ms a request). Real servers
        # answer at once; so must the stand-in, or it hides the bridge's own costs (bench/overhead.py).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (base signature)
        return None

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        self._serve()

    do_GET = do_PUT = do_DELETE = do_PATCH = do_POST

    def _serve(self) -> None:
        length = self.headers.get("content-length")
        body = self.rfile.read(int(length)) if length and length.isdigit() else b""
        parts = urlsplit(self.path)
        path = parts.path
        route: Route = ("storage" if path.startswith("/storage/") else "rest" if path.startswith("/rest/")
                        else _FUNCTION_ROUTES.get(path, "other"))
        request = RecordedRequest(
            method=self.command, path=path, route=route, query=parts.query,
            headers={k.lower(): v for k, v in self.headers.items()}, body=body,
        )
        with self.stub._lock:
            self.stub.requests.append(request)
        if length and length.isdigit() and len(body) < int(length):
            # The client went away mid-body (a killed worker): like the real services, nothing is
            # stored or applied, and there is nobody to answer.
            request.outcome = "aborted"
            self.close_connection = True
            return
        if length is None and self.command == "POST":
            self.stub._violate(request, "no Content-Length")
        failure = self.stub._take_failure(route)
        if failure is not None:
            request.outcome = f"injected-{failure.mode}"
            if failure.mode == "status":
                request.status = failure.status
                self._answer(failure.status, {"error": "injected failure"})
                return
            if failure.mode == "hang":
                self.stub._stopping.wait(failure.hang_s)
            self._drop_connection()
            return
        hold = self.stub._holds.get(route)
        if hold is not None:
            try:
                hold.wait()
            except threading.BrokenBarrierError:
                request.outcome, request.status = "held-alone", 503
                self._answer(503, {"error": "held: the requests expected beside this one never came"})
                return
        status, answer = self.stub.handle(request)
        request.status = status
        self._answer(status, answer)

    def _answer(self, status: int, answer: Any) -> None:
        raw = isinstance(answer, _Raw)
        payload = answer.data if raw else json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", answer.content_type if raw else "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _drop_connection(self) -> None:
        """Close the TCP connection at once (RST), without an answer."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
