"""Every request the worker makes to its Supabase project, in one place (docs/APP_CONTRACT.md).

Storage (upload, download, signing) and the ``jobs`` row read go through supabase-py's async
client (:func:`supabase.AsyncClient`), over one ``httpx.AsyncClient`` of ours: our time limit, no
redirects, no proxy from the environment. supabase-py itself does not retry; the callers do
(bridge.reporting's retry/deadline loop; the cancel watcher polls again).

Two requests stay plain httpx, on the same client:

- the ``job-callback`` POST: its body must reach the function as the exact bytes that were signed
  (``X-Callback-Signature``). supabase-py's ``functions.invoke`` hands the body to httpx as
  ``json=``, which serialises it again (and cannot carry ready bytes), so the signature would not
  match;
- the GET of a signed Storage URL the app put in a job (the token is in the URL; there is no
  supabase-py call that takes a whole signed URL).

:class:`StorageFailed` carries the HTTP status of a refused Storage call, so callers can tell a
retryable answer (5xx, 429) from a final one.
"""

from __future__ import annotations

from typing import Any

import httpx
from pydantic import SecretStr
from postgrest.exceptions import APIError
from storage3.exceptions import StorageApiError
from supabase import AsyncClient, AsyncClientOptions

SIGNED_PREFIX = "/storage/v1/object/sign/"


class StorageFailed(RuntimeError):
    """Storage (or the database REST endpoint) refused a request; ``status`` is its HTTP status."""

    def __init__(self, what: str, status: int, error: str, message: str) -> None:
        self.status, self.error, self.message = status, error, message
        super().__init__(f"{what}: HTTP {status} {error}: {message}")

    @property
    def expired_token(self) -> bool:
        """Storage's answer to a signed URL whose token has expired (400 InvalidJWT, "exp" claim)."""
        # Only the expiry: any other InvalidJWT (a bad signature) must not become a service-key read.
        return self.status == 400 and '"exp" claim' in self.message


def _status(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class SupabaseIO:
    """The project's Storage, ``jobs`` table and edge functions, with the service key."""

    def __init__(self, url: str, service_key: SecretStr, *, request_timeout_s: float = 30.0,
                 http: httpx.AsyncClient | None = None) -> None:
        if not isinstance(service_key, SecretStr):
            raise TypeError("service_key must be a SecretStr")
        self.url = url.rstrip("/")
        self._key = service_key
        # trust_env=False: a proxy from the environment must not see the service key.
        self.http = http or httpx.AsyncClient(timeout=request_timeout_s, follow_redirects=False, trust_env=False)
        options = AsyncClientOptions(httpx_client=self.http, auto_refresh_token=False, persist_session=False)
        self.client = AsyncClient(self.url, service_key.get_secret_value(), options)

    def __repr__(self) -> str:
        return f"SupabaseIO(url={self.url!r})"

    async def aclose(self) -> None:
        await self.http.aclose()

    # --- Storage ------------------------------------------------------------------------------

    async def upload(self, bucket: str, path: str, data: bytes, content_type: str) -> None:
        """Store ``data`` at ``bucket/path``, upsert (a retried upload is harmless)."""
        try:
            await self.client.storage.from_(bucket).upload(
                path, data, {"content-type": content_type, "upsert": "true"})
        except StorageApiError as exc:
            raise StorageFailed(f"storage upload of {path}", _status(exc.status), exc.code, exc.message) from None

    async def download(self, bucket: str, path: str) -> bytes:
        """The object at ``bucket/path``, read with the service key."""
        try:
            return await self.client.storage.from_(bucket).download(path)
        except StorageApiError as exc:
            raise StorageFailed(f"storage download of {bucket}/{path}", _status(exc.status), exc.code,
                                exc.message) from None

    async def signed_url(self, bucket: str, path: str, expires_in_s: int) -> str:
        try:
            answer = await self.client.storage.from_(bucket).create_signed_url(path, expires_in_s)
        except StorageApiError as exc:
            raise StorageFailed(f"signing {bucket}/{path}", _status(exc.status), exc.code, exc.message) from None
        return str(answer["signedURL"])

    def signed_object(self, url: str) -> tuple[str, str] | None:
        """``(bucket, path)`` when ``url`` is a signed URL of this project's Storage, else None."""
        base = httpx.URL(self.url)
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError):
            return None
        if (parsed.scheme, parsed.host, parsed.port) != (base.scheme, base.host, base.port):
            return None
        rest = parsed.path
        prefix = (base.path.rstrip("/") + SIGNED_PREFIX)
        if not rest.startswith(prefix) or "token" not in parsed.params:
            return None
        bucket, _, path = rest[len(prefix):].partition("/")
        return (bucket, path) if bucket and path else None

    async def get_signed(self, url: str, max_bytes: int) -> bytes:
        """GET a signed URL of this project's Storage as it is (its token is its authority)."""
        async with self.http.stream("GET", url) as response:
            if response.status_code != 200:
                await response.aread()
                try:
                    body = response.json()
                    error, message = str(body.get("error", "")), str(body.get("message", ""))
                except (ValueError, AttributeError):
                    error, message = "", response.text[:200]
                raise StorageFailed("signed URL", response.status_code, error, message)
            buffer = bytearray()
            async for chunk in response.aiter_bytes():
                buffer.extend(chunk)
                if len(buffer) > max_bytes:
                    raise StorageFailed("signed URL", 413, "TooLarge", f"over the {max_bytes}-byte limit")
            return bytes(buffer)

    # --- the jobs table -----------------------------------------------------------------------

    async def job_status(self, job_id: str) -> str | None:
        """The app's ``jobs`` row status (``GET /rest/v1/jobs?id=eq.{id}&select=status``), or None
        when there is no such row. Raises httpx errors and :class:`StorageFailed` as they come."""
        try:
            answer = await self.client.table("jobs").select("status").eq("id", job_id).execute()
        except APIError as exc:
            raise StorageFailed("jobs row read", _status(exc.code) or 400, str(exc.code), str(exc.message)) from None
        rows = answer.data or []
        return str(rows[0].get("status")) if rows and isinstance(rows[0], dict) else None

    # --- edge functions -----------------------------------------------------------------------

    async def post_function(self, path: str, body: bytes, headers: dict[str, str], timeout_s: float) -> httpx.Response:
        """POST exact ``body`` bytes to ``{url}{path}`` (see the module docstring for why not invoke)."""
        return await self.http.post(f"{self.url}{path}", content=body, headers=headers, timeout=timeout_s)
