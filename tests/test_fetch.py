"""bridge.fetch: the reference-image fetcher refuses everything docs/APP_CONTRACT.md §2/§3 and SSRF safety say it
must, and fetches a good image. Only loopback is ever contacted: an autouse guard fails the test
if any socket tries to connect elsewhere."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from bridge.fetch import MAX_REDIRECTS, FetchError, fetch_reference_image

MB = 1024 * 1024


def _png(width: int = 200, height: int = 120) -> bytes:
    image = Image.new("RGB", (width, height))
    for x in range(width):
        image.putpixel((x, x % height), (x % 256, 40, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression-bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GOOD_PNG = _png()


class _ImageServer:
    """A small HTTP server on 127.0.0.1 with the routes the tests need; records what it saw."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.huge_bytes_sent = 0
        self.stop_event = threading.Event()
        server_self = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return None

            def do_GET(self) -> None:  # noqa: N802
                server_self.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                parts = urlsplit(self.path)
                route = getattr(server_self, "route_" + parts.path.strip("/").split("/")[0].replace("-", "_"), None)
                if route is None:
                    self._send(404, b"not found", "text/plain")
                else:
                    route(self, parse_qs(parts.query))

            def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

        self.handler = Handler
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.port = self.server.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.allowed = (f"127.0.0.1:{self.port}",)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # routes ------------------------------------------------------------------------------------

    def route_good_png(self, h, q) -> None:
        h._send(200, GOOD_PNG, "image/png")

    def route_text(self, h, q) -> None:
        h._send(200, b"<html>not an image</html>", "text/html")

    def route_truncated(self, h, q) -> None:
        h._send(200, GOOD_PNG[: len(GOOD_PNG) // 2], "image/png")

    def route_bomb(self, h, q) -> None:
        h._send(200, _png_claiming(30000, 30000), "image/png")

    def route_redirect(self, h, q) -> None:
        h._send(302, b"", "text/plain", {"Location": q["to"][0]})

    def route_chain(self, h, q) -> None:
        """``n`` redirects in a row, then the good PNG."""
        left = int(q["n"][0])
        target = "/good-png" if left <= 1 else f"/chain?n={left - 1}"
        h._send(307, b"", "text/plain", {"Location": target})

    def route_huge(self, h, q) -> None:
        """100 MB, no Content-Length (close-delimited), in 64 KiB chunks until the client leaves."""
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        chunk = GOOD_PNG[:8] + b"\0" * (64 * 1024 - 8)
        try:
            for _ in range(1600):
                h.wfile.write(chunk)
                self.huge_bytes_sent += len(chunk)
        except OSError:
            pass

    def route_declared_huge(self, h, q) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(500 * MB))
        h.end_headers()
        h.close_connection = True
        try:
            h.wfile.write(GOOD_PNG)
        except OSError:
            pass

    def route_drip(self, h, q) -> None:
        """Headers at once, then one byte every 0.1 s (a slow-loris body)."""
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Content-Length", str(len(GOOD_PNG)))
        h.end_headers()
        h.close_connection = True
        try:
            for byte in GOOD_PNG:
                if self.stop_event.wait(0.1):
                    return
                h.wfile.write(bytes([byte]))
                h.wfile.flush()
        except OSError:
            pass

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]


@pytest.fixture(scope="module")
def image_server():
    server = _ImageServer()
    server.thread.start()
    yield server
    server.stop_event.set()
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch):
    """Fail the test if any socket tries to connect to a non-loopback address (nothing is sent)."""
    attempts: list[object] = []
    original = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not ipaddress.ip_address(str(host).split("%")[0]).is_loopback:
            attempts.append(address)
            raise OSError(f"test guard: connection to {address} refused")
        return original(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield attempts
    assert attempts == [], f"tried to connect to non-loopback addresses: {attempts}"


async def _fetch(url: str, *, max_bytes: int = 5 * MB, timeout_s: float = 5.0, allowed=(), **kw) -> bytes:
    return await fetch_reference_image(url, max_bytes=max_bytes, timeout_s=timeout_s, allowed_private_hosts=allowed, **kw)


def test_guard_blocks_non_loopback(loopback_only):
    """The safety net itself works (else the other tests prove nothing about traffic)."""
    with socket.socket() as sock, pytest.raises(OSError, match="test guard"):
        sock.connect(("10.0.0.1", 80))
    assert loopback_only == [("10.0.0.1", 80)]
    loopback_only.clear()


async def test_good_png_from_allowed_host(image_server):
    data = await _fetch(f"{image_server.base}/good-png", allowed=image_server.allowed)
    assert data == GOOD_PNG
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (200, 120)


async def test_hostname_connects_to_checked_ip_with_host_header_kept(image_server):
    """localhost is resolved and checked here; the request carries Host: localhost:port."""
    url = f"http://localhost:{image_server.port}/good-png?via=localhost"
    data = await _fetch(url, allowed=(f"localhost:{image_server.port}",))
    assert data == GOOD_PNG
    [(path, headers)] = [r for r in image_server.requests if "via=localhost" in r[0]]
    assert headers["host"] == f"localhost:{image_server.port}"


async def test_loopback_refused_when_not_allowed(image_server):
    before = len(image_server.requests)
    with pytest.raises(FetchError, match=r"^reference_image_url: request to private address 127\.0\.0\.1 refused"):
        await _fetch(f"{image_server.base}/good-png")
    assert len(image_server.requests) == before  # refused before connecting


async def test_hostname_resolving_to_loopback_refused(image_server):
    with pytest.raises(FetchError, match=r"host 'localhost' refused: it resolves to a private address$") as info:
        await _fetch(f"http://localhost:{image_server.port}/good-png")
    assert "127.0.0.1" not in str(info.value) and "::1" not in str(info.value)  # the address stays in the log


async def test_allowed_entry_is_per_port(image_server):
    with pytest.raises(FetchError, match="private address 127.0.0.1 refused"):
        await _fetch(f"{image_server.base}/good-png", allowed=(f"127.0.0.1:{image_server.port + 1}",))


@pytest.mark.parametrize(
    "host",
    ["10.0.0.1", "169.254.169.254", "192.168.1.10", "172.16.0.5", "100.64.0.1", "0.0.0.0", "224.0.0.1",
     "240.0.0.1", "[::1]", "[fe80::1]", "[fc00::1]", "[::ffff:10.0.0.1]", "[::]", "[ff02::1]"],
)
async def test_non_public_addresses_refused_before_connecting(host):
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"private address .* refused"):
        await _fetch(f"http://{host}/image.png", timeout_s=5.0)
    assert time.monotonic() - started < 1.0  # no connection attempt (the guard would also fail)


@pytest.mark.parametrize("target", ["http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/"])
async def test_redirect_to_private_address_refused(image_server, target):
    with pytest.raises(FetchError) as info:
        await _fetch(f"{image_server.base}/redirect?to={target}", allowed=image_server.allowed)
    address = urlsplit(target).hostname
    assert str(info.value) == f"reference_image_url: redirect to private address {address} refused"


async def test_redirects_followed_up_to_the_limit(image_server):
    before = len(image_server.requests)
    data = await _fetch(f"{image_server.base}/chain?n={MAX_REDIRECTS}", allowed=image_server.allowed)
    assert data == GOOD_PNG
    assert len(image_server.requests) - before == MAX_REDIRECTS + 1
    with pytest.raises(FetchError, match=f"more than {MAX_REDIRECTS} redirects refused"):
        await _fetch(f"{image_server.base}/chain?n={MAX_REDIRECTS + 1}", allowed=image_server.allowed)


@pytest.mark.parametrize(
    "url,scheme",
    [("file:///etc/passwd", "file"), ("ftp://example.com/a.png", "ftp"),
     ("data:image/png;base64,iVBORw0KGgo=", "data"), ("gopher://example.com/", "gopher")],
)
async def test_other_schemes_refused(url, scheme):
    with pytest.raises(FetchError, match=f"scheme '{scheme}' refused; only http and https are allowed"):
        await _fetch(url)


async def test_redirect_to_file_scheme_refused(image_server):
    with pytest.raises(FetchError, match="redirect to scheme 'file' refused"):
        await _fetch(f"{image_server.base}/redirect?to=file:///etc/passwd", allowed=image_server.allowed)


async def test_non_image_refused(image_server):
    with pytest.raises(FetchError, match="content is not an image we can read"):
        await _fetch(f"{image_server.base}/text", allowed=image_server.allowed)


async def test_truncated_image_refused(image_server):
    with pytest.raises(FetchError, match="not an image we can read"):
        await _fetch(f"{image_server.base}/truncated", allowed=image_server.allowed)


async def test_decompression_bomb_refused(image_server):
    with pytest.raises(FetchError, match="30000x30000|decompression bomb"):
        await _fetch(f"{image_server.base}/bomb", allowed=image_server.allowed)


async def test_pixel_limit(image_server):
    with pytest.raises(FetchError, match=r"200x120 pixels, over the 10000-pixel limit"):
        await _fetch(f"{image_server.base}/good-png", allowed=image_server.allowed, max_pixels=10_000)


async def test_huge_body_refused_while_streaming(image_server):
    started = time.monotonic()
    with pytest.raises(FetchError, match="over the 262144-byte limit \\(refused while downloading\\)"):
        await _fetch(f"{image_server.base}/huge", allowed=image_server.allowed, max_bytes=256 * 1024)
    assert time.monotonic() - started < 3.0
    await asyncio.sleep(0.3)  # let the server notice the closed connection
    assert image_server.huge_bytes_sent < 40 * MB  # far from the 100 MB it would have sent


async def test_declared_size_over_limit_refused_before_reading(image_server):
    with pytest.raises(FetchError, match=f"image is {500 * MB} bytes, over the 1048576-byte limit"):
        await _fetch(f"{image_server.base}/declared-huge", allowed=image_server.allowed, max_bytes=MB)


async def test_slow_drip_refused_within_time_limit(image_server):
    started = time.monotonic()
    with pytest.raises(FetchError, match="not fetched within the 1 s time limit"):
        await _fetch(f"{image_server.base}/drip", allowed=image_server.allowed, timeout_s=1.0)
    assert time.monotonic() - started < 1.5


async def test_http_error_status(image_server):
    with pytest.raises(FetchError, match="the server answered HTTP 404"):
        await _fetch(f"{image_server.base}/missing", allowed=image_server.allowed)


async def test_invalid_url():
    with pytest.raises(FetchError, match="reference_image_url: "):
        await _fetch("http://")


async def test_ipv6_allowed_entry(image_server):
    """An IPv6 loopback entry is honoured (nothing listens on [::1] here, so the error is a connect one)."""
    with pytest.raises(FetchError, match="cannot connect to '::1'"):
        await _fetch(f"http://[::1]:{image_server.port}/good-png", allowed=(f"[::1]:{image_server.port}",))
