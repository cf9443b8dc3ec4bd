"""URL fetching: the SSRF rules, and a real fetch from a local HTTP server through each of them."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import threading
import tracemalloc
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from localvl.errors import InvalidRequestError
from localvl.media import fetch as fetch_module
from localvl.media.fetch import UrlPolicy, _rule, checked_address, fetch, fetch_all
from tests.helpers import image_bytes

PNG = image_bytes("PNG", size=(40, 30))


@pytest.mark.parametrize(
    "address, rule",
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.9", "private"),
        ("192.168.1.1", "private"), ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"), ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("::ffff:127.0.0.1", "loopback"),
        ("2002:7f00:1::", "loopback"), ("fd00:ec2::254", "private"), ("240.0.0.1", "reserved"),
        ("fec0::1", "site-local"),
        ("8.8.8.8", None), ("2001:4860:4860::8888", None), ("1.1.1.1", None),
    ],
)
def test_addresses_are_sorted_by_the_rule_that_refuses_them(address, rule):
    found = _rule(ipaddress.ip_address(address))
    assert (found is None) if rule is None else (rule in found)


def check(url: str, policy: UrlPolicy = UrlPolicy()):
    return asyncio.run(checked_address(url, policy))


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://example.com/a.png", "only http and https"),
        ("http://localhost:8000/a.png", "localhost name"),
        ("http://img.localhost/a.png", "localhost name"),
        ("http://user:pw@1.1.1.1/a.png", "credentials"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/a.png", "loopback"),
        ("http://10.0.0.1/a.png", "private"),
        ("http:///a.png", "no host"),
    ],
)
def test_urls_are_refused_with_the_rule_that_refused_them(url, message):
    with pytest.raises(InvalidRequestError, match=message):
        check(url)


def test_the_allowlist_admits_names_addresses_and_networks():
    assert check("http://localhost/a.png", UrlPolicy(("localhost",)))[2].is_loopback
    assert str(check("http://10.1.2.3/a.png", UrlPolicy(("10.0.0.0/8",)))[2]) == "10.1.2.3"
    with pytest.raises(InvalidRequestError):
        check("http://10.1.2.3/a.png", UrlPolicy(("10.9.0.0/16",)))


def test_a_name_with_any_private_answer_is_refused(monkeypatch):
    async def resolve(host, port):
        return [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("10.0.0.7")]

    monkeypatch.setattr(fetch_module, "_resolve", resolve)
    with pytest.raises(InvalidRequestError, match="10.0.0.7, a private address"):
        check("https://images.example/a.png")


def _zeros_compressed(compressor, size: int) -> bytes:
    piece = b"\0" * (1 << 20)
    return b"".join(compressor.compress(piece) for _ in range(size >> 20)) + compressor.flush()


# 256 MiB of zeros each: a few hundred kilobytes (gzip) or a few kilobytes (zstd) on the wire.
BOMB_SIZE = 256 << 20
GZIP_BOMB = _zeros_compressed(zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS), BOMB_SIZE)
try:
    import zstandard  # httpx decodes zstd by itself whenever this is installed
except ImportError:
    zstandard = None
ZSTD_BOMB = _zeros_compressed(zstandard.ZstdCompressor().compressobj(), BOMB_SIZE) if zstandard else b""


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args):
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        Handler.hosts.append(self.headers.get("Host", ""))
        port = self.server.server_address[1]
        routes = {
            "/cat.png": lambda: self._send(200, PNG, {"Content-Type": "image/png"}),
            "/big.png": lambda: self._send(200, PNG + b"\0" * 200_000, {"Content-Type": "image/png"}),
            "/page": lambda: self._send(200, b"<html></html>", {"Content-Type": "text/html"}),
            "/untyped.png": lambda: self._send(200, PNG, {"Content-Type": "binary/octet-stream"}),
            "/missing": lambda: self._send(404),
            "/to-cat": lambda: self._send(302, headers={"Location": f"http://127.0.0.1:{port}/cat.png"}),
            "/to-private": lambda: self._send(302, headers={"Location": "http://10.0.0.1/cat.png"}),
            "/to-metadata": lambda: self._send(301, headers={"Location": "http://169.254.169.254/latest/"}),
            "/loop": lambda: self._send(302, headers={"Location": "/loop"}),
            "/bomb": lambda: self._send(200, gzip.compress(b"\0" * 2_000_000),
                                        {"Content-Type": "image/png", "Content-Encoding": "gzip"}),
            "/gzip-bomb": lambda: self._send(200, GZIP_BOMB, {"Content-Type": "image/png", "Content-Encoding": "gzip"}),
            "/zstd-bomb": lambda: self._send(200, ZSTD_BOMB, {"Content-Type": "image/png", "Content-Encoding": "zstd"}),
            "/cat.png.gz": lambda: self._send(200, gzip.compress(PNG), {"Content-Type": "image/png", "Content-Encoding": "gzip"}),
            "/cat.png.deflate": lambda: self._send(200, zlib.compress(PNG), {"Content-Type": "image/png", "Content-Encoding": "deflate"}),
        }
        routes.get(self.path, lambda: self._send(404))()


@pytest.fixture(scope="module")
def origin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


ALLOW = UrlPolicy(("127.0.0.1",), total_timeout=10)


def get(url: str, policy: UrlPolicy = ALLOW, max_bytes: int = 100_000):
    return asyncio.run(fetch(url, policy, max_bytes))


def test_an_allowlisted_server_is_fetched_and_an_unlisted_one_refused(origin):
    assert get(origin + "/cat.png").data == PNG
    with pytest.raises(InvalidRequestError, match="loopback"):
        get(origin + "/cat.png", UrlPolicy())


@pytest.mark.parametrize(
    "path, message",
    [
        ("/big.png", "200157 bytes, more than the 100000 accepted"),  # said by its Content-Length
        ("/bomb", "larger than the 100000 bytes accepted"),  # found while reading: 2 MB unzipped
        ("/page", "text/html"),
        ("/missing", "HTTP 404"),
        ("/to-private", "10.0.0.1, a private address"),
        ("/to-metadata", "link-local"),
        ("/loop", "more than 5 redirects"),
    ],
)
def test_each_rule_holds_over_a_real_connection(origin, path, message):
    with pytest.raises(InvalidRequestError, match=message):
        get(origin + path)


def test_an_object_stores_untyped_file_is_taken_for_its_bytes_to_decide(origin):
    fetched = get(origin + "/untyped.png")
    assert fetched.data == PNG and fetched.content_type is None


def test_redirects_are_followed_when_each_hop_is_allowed(origin):
    assert get(origin + "/to-cat").data == PNG


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(origin, monkeypatch):
    """No second DNS lookup can swap the address: the name travels only in the Host header."""
    port = origin.rsplit(":", 1)[1]
    looked_up: list[str] = []

    async def resolve(host, port_):
        looked_up.append(host)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(fetch_module, "_resolve", resolve)
    Handler.hosts.clear()
    data = get(f"http://images.test:{port}/cat.png", UrlPolicy(("images.test",)))
    assert data.data == PNG and Handler.hosts == [f"images.test:{port}"] and looked_up == ["images.test"]


def test_fetch_all_names_where_a_url_sat(origin):
    urls = [(origin + "/cat.png", "messages.0.content.0.source.url"), (origin + "/page", "messages.1.content.2.source.url")]
    with pytest.raises(InvalidRequestError, match=r"^messages\.1\.content\.2\.source\.url: the server sent text/html"):
        asyncio.run(fetch_all(urls, ALLOW, 100_000))
    assert asyncio.run(fetch_all(urls[:1], ALLOW, 100_000)) == {origin + "/cat.png": PNG}


def test_compressed_bodies_are_decoded(origin):
    assert get(origin + "/cat.png.gz").data == PNG
    assert get(origin + "/cat.png.deflate").data == PNG


@pytest.mark.parametrize("path", ["/gzip-bomb", "/zstd-bomb"])
def test_a_compression_bomb_is_refused_without_being_inflated_in_memory(origin, path):
    """The byte cap must hold while decoding, not after: a few kilobytes of zstd (or a few hundred
    of gzip) that inflate to 256 MiB must never be held whole, or even in large pieces."""
    if path == "/zstd-bomb" and zstandard is None:
        pytest.skip("zstandard is not installed")
    tracemalloc.start()
    try:
        with pytest.raises(InvalidRequestError):
            get(origin + path, max_bytes=1_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20


@pytest.mark.parametrize("url", [
    "http://[127.0.0.1]/a.png",  # urlsplit raises ValueError: an IPv4 address in brackets
    "http://[::1/a.png",  # an unclosed bracket
    "http://127.0.0.1:9/" + "a" * 70_000,  # past httpx's URL length
    "http://127.0.0.1:9/a\x00.png",  # a character httpx refuses to send
])
def test_a_url_that_cannot_be_parsed_or_sent_is_an_invalid_request(url):
    """Refused before any connection is made, as the client's error (a 400), not a crash."""
    with pytest.raises(InvalidRequestError):
        get(url)
