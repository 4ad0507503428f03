"""Fetching a job's reference image (``metadata.reference_image_url``) without becoming an SSRF hole.

The URL comes from a user. Every hop (the first request and each redirect, followed by hand, at most
:data:`MAX_REDIRECTS`) is checked before anything is sent: only ``http``/``https``; the host is
resolved here and every address it resolves to must be public (not private, loopback, link-local,
multicast, reserved or unspecified, IPv4 or IPv6, IPv4-mapped included) unless ``host:port`` is in
``allowed_private_hosts``. The request then goes to the checked IP itself, with the original
``Host`` header and TLS server name (SNI, certificate check) kept, so a second DNS answer cannot
swap the address (DNS rebinding). The body is streamed and refused as soon as it passes
``max_bytes``; the whole fetch has one time limit (slow drip included); the result must decode as
an image of at most ``max_pixels`` pixels (decompression bombs). Every refusal is a
:class:`FetchError` whose message says what was refused and why.

:func:`fetch_job_reference` adds the app's two other forms (docs/APP_CONTRACT.md, "Reference
images"): a raw storage path (``user-library/{user_id}/...``) is downloaded from Storage with the
service key, only under the job's own user id (the app checks that ownership before it signs);
a signed URL of our own project's Storage is read as it is, and when its token has expired
(Storage: 400 ``InvalidJWT``, ``"exp" claim``) the object it names is downloaded with the service
key instead. The Storage calls are bridge.supabase_io's; every other URL goes through the checks
above. In local mode (no Supabase) a raw path is a clear refusal.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import socket
import warnings
from typing import Iterable

import httpx
from PIL import Image

from bridge.app_payload import storage_path
from bridge.supabase_io import StorageFailed, SupabaseIO

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_FIELD = "reference_image_url"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(RuntimeError):
    """The reference image was refused or could not be fetched; the message says why."""


async def fetch_reference_image(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    allowed_private_hosts: Iterable[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """The bytes of the image at ``url``, checked as described in the module docstring.

    ``allowed_private_hosts`` holds ``"host:port"`` entries (``"127.0.0.1:8080"``,
    ``"[::1]:8080"``, ``"localhost:8080"``) that may be non-public; meant for tests and
    deliberate internal sources.
    """
    allowed = {_normalise_allowed(entry) for entry in allowed_private_hosts}
    try:
        async with asyncio.timeout(timeout_s):
            data = await _fetch_following_redirects(url, max_bytes, timeout_s, allowed)
    except TimeoutError:
        raise FetchError(f"{_FIELD}: not fetched within the {timeout_s:g} s time limit") from None
    await asyncio.to_thread(_check_image, data, max_pixels)
    return data


async def fetch_job_reference(
    url: str,
    *,
    user_id: str,
    storage: SupabaseIO | None,
    max_bytes: int,
    timeout_s: float,
    allowed_private_hosts: Iterable[str] = (),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> bytes:
    """A job's reference image from a URL, a raw storage path, or one of our signed URLs (see
    the module docstring). Raises :class:`FetchError` with the reason when it cannot be had."""
    raw = storage_path(url)
    signed = storage.signed_object(url) if storage is not None and raw is None else None
    if raw is None and signed is None:
        return await fetch_reference_image(url, max_bytes=max_bytes, timeout_s=timeout_s,
                                           allowed_private_hosts=allowed_private_hosts, max_pixels=max_pixels)
    if storage is None:
        raise FetchError(f"{_FIELD}: {url!r} is a storage path, and this worker has no Supabase project "
                         "(SUPABASE_URL) to fetch it from")
    try:
        async with asyncio.timeout(timeout_s):
            if raw is not None:
                bucket, path = raw
                if path.split("/", 1)[0] != user_id:
                    raise FetchError(f"{_FIELD}: storage path {url!r} is not under this job's user id")
                data = await storage.download(bucket, path)
            else:
                data = await _signed_or_download(storage, url, signed, max_bytes)
    except TimeoutError:
        raise FetchError(f"{_FIELD}: not fetched from storage within the {timeout_s:g} s time limit") from None
    except StorageFailed as exc:
        raise FetchError(f"{_FIELD}: {exc}") from None
    except httpx.HTTPError as exc:
        log.warning("reference image: storage unreachable: %s: %s", type(exc).__name__, exc)
        raise FetchError(f"{_FIELD}: storage unreachable") from None
    if len(data) > max_bytes:
        raise FetchError(f"{_FIELD}: image is {len(data)} bytes, over the {max_bytes}-byte limit")
    await asyncio.to_thread(_check_image, data, max_pixels)
    return data


async def _signed_or_download(storage: SupabaseIO, url: str, signed: tuple[str, str], max_bytes: int) -> bytes:
    """A signed URL as it is; expired, the object it names downloaded with the service key (the
    expiry answer comes after Storage checked the token's signature, so the path is the app's)."""
    try:
        return await storage.get_signed(url, max_bytes)
    except StorageFailed as exc:
        if not exc.expired_token:
            raise
    log.info("reference URL expired; downloading %s/%s with the service key", *signed)
    return await storage.download(*signed)


async def _fetch_following_redirects(url: str, max_bytes: int, timeout_s: float, allowed: set[str]) -> bytes:
    """Follow redirects by hand, checking each hop before connecting; return the final body."""
    current = _parse_url(url, hop=0)
    timeout = httpx.Timeout(timeout_s)
    # trust_env=False: no proxy from the environment may carry the request around the checks.
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for hop in range(MAX_REDIRECTS + 1):
            addresses = await _resolve_checked(current, hop, allowed)
            response_or_body = await _get_from_any(client, current, addresses, max_bytes)
            if isinstance(response_or_body, bytes):
                return response_or_body
            location = response_or_body
            if hop == MAX_REDIRECTS:
                raise FetchError(f"{_FIELD}: more than {MAX_REDIRECTS} redirects refused")
            try:
                current = _parse_url(str(current.join(location)), hop=hop + 1)
            except httpx.InvalidURL as exc:
                raise FetchError(f"{_FIELD}: redirect to an invalid URL refused ({exc})") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _parse_url(url: str, *, hop: int) -> httpx.URL:
    """Parse ``url`` and refuse anything but an absolute http(s) URL with a host."""
    what = "redirect to" if hop else "URL with"
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise FetchError(f"{_FIELD}: invalid URL ({exc})") from None
    if parsed.scheme not in _DEFAULT_PORTS:
        scheme = parsed.scheme or "(none)"
        raise FetchError(f"{_FIELD}: {what} scheme {scheme!r} refused; only http and https are allowed")
    if not parsed.host:
        raise FetchError(f"{_FIELD}: URL has no host")
    return parsed


def _port_of(url: httpx.URL) -> int:
    return url.port or _DEFAULT_PORTS[url.scheme]


async def _resolve_checked(url: httpx.URL, hop: int, allowed: set[str]) -> list[IPAddress]:
    """Resolve the URL's host; every address must be public or its ``host:port`` allowed."""
    host, port = url.host, _port_of(url)
    try:
        addresses, literal = [ipaddress.ip_address(host)], True
    except ValueError:
        addresses, literal = await _resolve(host, port), False
    for address in addresses:
        if _is_public(address) or _is_allowed(host, address, port, allowed):
            continue
        where = "redirect to" if hop else "request to"
        if literal:
            raise FetchError(f"{_FIELD}: {where} private address {host} refused")
        # The address a name resolved to stays in the log: the job's error reaches the client.
        log.warning("reference image host %r resolved to private address %s; refused", host, address)
        raise FetchError(f"{_FIELD}: {where} host {host!r} refused: it resolves to a private address")
    return addresses


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchError(f"{_FIELD}: cannot resolve host {host!r} ({exc})") from None
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise FetchError(f"{_FIELD}: host {host!r} has no address")
    return addresses


def _is_public(address: IPAddress) -> bool:
    """True for a globally routable unicast address (IPv4-mapped/6to4/Teredo judged by the IPv4 inside)."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if inner is not None and not _is_public(inner):
            return False
    flags = (
        address.is_private,
        address.is_loopback,
        address.is_link_local,
        address.is_multicast,
        address.is_reserved,
        address.is_unspecified,
    )
    return address.is_global and not any(flags)


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _normalise_allowed(entry: str) -> str:
    return entry.strip().lower()


def _is_allowed(host: str, address: IPAddress, port: int, allowed: set[str]) -> bool:
    candidates = {f"{_format_host(host)}:{port}".lower(), f"{_format_host(str(address))}:{port}"}
    return bool(candidates & allowed)


async def _get_from_any(
    client: httpx.AsyncClient, url: httpx.URL, addresses: list[IPAddress], max_bytes: int
) -> bytes | str:
    """GET ``url`` from the first checked address that accepts a connection.

    Returns the body, or the ``Location`` of a redirect.
    """
    last_error: Exception | None = None
    for address in addresses:
        try:
            return await _get_once(client, url, address, max_bytes)
        except httpx.ConnectError as exc:
            last_error = exc
    # The connection errors name addresses (private ones too): the log has them, the app the host it gave.
    log.warning("reference image: cannot connect to %r: %s", url.host, last_error)
    raise FetchError(f"{_FIELD}: cannot connect to {url.host!r}")


async def _get_once(client: httpx.AsyncClient, url: httpx.URL, address: IPAddress, max_bytes: int) -> bytes | str:
    """One GET sent to ``address`` with the URL's own Host header and TLS server name."""
    target = url.copy_with(host=str(address))
    headers = {"Host": url.netloc.decode("ascii"), "Accept": "image/*", "Accept-Encoding": "identity"}
    extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
    try:
        async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
            if response.status_code in _REDIRECT_STATUSES:
                location = response.headers.get("location")
                if not location:
                    raise FetchError(f"{_FIELD}: redirect (HTTP {response.status_code}) without a Location")
                return location
            if response.status_code != 200:
                raise FetchError(f"{_FIELD}: the server answered HTTP {response.status_code}")
            return await _read_limited(response, max_bytes)
    except httpx.ConnectError:
        raise
    except httpx.TimeoutException:
        raise FetchError(f"{_FIELD}: timed out talking to {url.host!r}") from None
    except httpx.HTTPError as exc:
        log.warning("reference image: download from %r failed: %s: %s", url.host, type(exc).__name__, exc)
        raise FetchError(f"{_FIELD}: download from {url.host!r} failed") from None


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    """Read the body, refusing it as soon as it is known to exceed ``max_bytes``."""
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{_FIELD}: image is {int(declared)} bytes, over the {max_bytes}-byte limit")
    buffer = bytearray()
    async for chunk in response.aiter_bytes():
        buffer.extend(chunk)
        if len(buffer) > max_bytes:
            raise FetchError(f"{_FIELD}: image is over the {max_bytes}-byte limit (refused while downloading)")
    return bytes(buffer)


def _check_image(data: bytes, max_pixels: int) -> None:
    """Refuse data that is not a fully decodable image of at most ``max_pixels`` pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise FetchError(
                        f"{_FIELD}: image is {width}x{height} pixels, over the {max_pixels}-pixel limit"
                    )
                image.load()
    except FetchError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise FetchError(f"{_FIELD}: image refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises many types for bad data
        raise FetchError(
            f"{_FIELD}: content is not an image we can read ({', '.join(IMAGE_FORMATS)}): {exc}"
        ) from None
