"""Fetching media by URL without opening an SSRF hole.

A URL in a request makes the server open a connection on the client's behalf, from inside the
network the server sits in. So before any connection: the scheme must be http(s); the host's
every DNS answer must be a public address (not loopback, private, link-local — which holds the
cloud metadata service —, CGNAT, multicast, reserved or unspecified, for IPv4 and IPv6, IPv4
embedded in IPv6 included); ``localhost`` names are refused outright. Then the connection goes to
the address that was checked (the URL's host travels only as the Host header and the TLS server
name), so a second DNS answer cannot swap in an internal address. Redirects are followed by hand,
each one checked the same way. The body is read in pieces and abandoned past the byte cap; a
compressed body is inflated here, a bounded piece at a time, so the cap holds for what it inflates
to (httpx's own decoders inflate a whole network read at once: kilobytes of zstd become gigabytes).
``allow`` (hosts, addresses or networks) admits intranet servers on purpose.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator
from urllib.parse import urljoin, urlsplit

import httpx

from localvl.errors import InvalidRequestError

MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _rule(address: IPAddress) -> str | None:
    """Why ``address`` may not be fetched from, or None if it is a public address."""
    embedded = getattr(address, "ipv4_mapped", None) or getattr(address, "sixtofour", None)
    teredo = getattr(address, "teredo", None)
    if embedded is not None:
        return _rule(embedded)
    if teredo is not None:
        return _rule(teredo[1])
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (the cloud metadata service lives there)"
    if getattr(address, "is_site_local", False):  # IPv6 fec0::/10: deprecated, still some intranets' own
        return "a site-local address"
    if isinstance(address, ipaddress.IPv4Address) and address in CGNAT:
        return "a carrier-grade NAT address"
    if address.is_multicast:
        return "a multicast address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_reserved:
        return "a reserved address"
    if address.is_private:
        return "a private address"
    if not address.is_global:
        return "a reserved address"
    return None


@dataclass(frozen=True)
class UrlPolicy:
    """What may be fetched: public addresses always, plus ``allow``: host names, addresses, networks."""

    allow: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    total_timeout: float = 30.0
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(init=False, repr=False)
    _names: frozenset[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        networks, names = [], set()
        for item in self.allow:
            try:
                networks.append(ipaddress.ip_network(item.strip(), strict=False))
            except ValueError:
                names.add(item.strip().lower().rstrip("."))
        object.__setattr__(self, "_networks", tuple(networks))
        object.__setattr__(self, "_names", frozenset(names))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self._names

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self._networks)


@dataclass(frozen=True)
class Fetched:
    data: bytes
    content_type: str | None


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        answers = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise InvalidRequestError(f"the host {host!r} could not be resolved") from None
    return list(dict.fromkeys(ipaddress.ip_address(a[4][0].split("%")[0]) for a in answers))


async def checked_address(url: str, policy: UrlPolicy) -> tuple[str, int, IPAddress]:
    """(host, port, address to connect to) of ``url``, or the rule that refuses it."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # an unclosed bracket, an IPv4 address in brackets
        raise InvalidRequestError("the URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequestError("only http and https URLs are fetched")
    if not host:
        raise InvalidRequestError("the URL has no host")
    if parts.username or parts.password:
        raise InvalidRequestError("URLs with credentials are not fetched")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequestError("the URL has an invalid port") from None
    allowed_name = policy.allows_host(host)
    lowered = host.lower().rstrip(".")
    if not allowed_name and (lowered == "localhost" or lowered.endswith(".localhost")):
        raise InvalidRequestError(f"refused: {host} is a localhost name (admit it with --url-allowlist)")
    addresses = await _resolve(host, port)
    if not addresses:
        raise InvalidRequestError(f"the host {host!r} has no address")
    for address in addresses:
        rule = _rule(address)
        if rule is not None and not (allowed_name or policy.allows_address(address)):
            raise InvalidRequestError(f"refused: {host} resolves to {address}, {rule} (admit it with --url-allowlist)")
    return host, port, addresses[0]


# Only these are asked for and undone; anything else (zstd, br) is refused rather than inflated.
ACCEPT_ENCODING = "gzip, deflate"
PIECE = 64 * 1024  # the most one inflate step may produce


class _Inflater:
    """A ``Content-Encoding`` undone piece by piece, never more than ``PIECE`` bytes per step."""

    def __init__(self, encoding: str) -> None:
        coding = encoding.strip().lower()
        if coding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            raise InvalidRequestError(f"the server sent the body as Content-Encoding {coding[:40]!r}, which is not accepted")
        self._deflate = coding == "deflate"
        self._zlib = None if coding in ("", "identity") else zlib.decompressobj(
            zlib.MAX_WBITS if self._deflate else 16 + zlib.MAX_WBITS)
        self._started = False

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self._zlib is None:
            if data:
                yield data
            return
        if self._deflate and not self._started and data:
            # "deflate" is meant to be zlib-wrapped, but some servers send it raw (httpx guesses too).
            self._started = True
            if (data[0] & 0x0F) != 8 or (len(data) > 1 and ((data[0] << 8) | data[1]) % 31):
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        while data and not self._zlib.eof:
            try:
                out = self._zlib.decompress(data, PIECE)
            except zlib.error:
                raise InvalidRequestError("the server sent a corrupt compressed body") from None
            data = self._zlib.unconsumed_tail
            if out:
                yield out


# What servers send for a file whose type nobody recorded (S3's and GCS's default for uploads
# without one): like no Content-Type at all, the bytes decide (images are sniffed, PDFs checked).
UNTYPED = frozenset({"application/octet-stream", "binary/octet-stream"})


async def fetch(url: str, policy: UrlPolicy, max_bytes: int, accept: Iterable[str] = ("image/",)) -> Fetched:
    """The body at ``url`` (after at most ``MAX_REDIRECTS`` checked redirects), at most ``max_bytes``."""
    timeout = httpx.Timeout(policy.read_timeout, connect=policy.connect_timeout)
    try:
        async with asyncio.timeout(policy.total_timeout):
            async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    host, port, address = await checked_address(url, policy)
                    parts = urlsplit(url)
                    netloc = f"[{address}]" if address.version == 6 else str(address)
                    target = parts._replace(netloc=f"{netloc}:{port}").geturl()
                    headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": ", ".join(f"{a}*" for a in accept),
                               "Accept-Encoding": ACCEPT_ENCODING}
                    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
                    async with client.stream("GET", target, headers=headers, extensions=extensions) as response:
                        if response.is_redirect:
                            location = response.headers.get("location")
                            if not location:
                                raise InvalidRequestError(f"HTTP {response.status_code} redirect without a location")
                            url = urljoin(url, location)
                            continue
                        if response.status_code != 200:
                            raise InvalidRequestError(f"the server answered HTTP {response.status_code}")
                        content_type = response.headers.get("content-type", "").split(";")[0].strip().lower() or None
                        if content_type in UNTYPED:  # object stores' default: the bytes say what it is
                            content_type = None
                        if content_type is not None and not any(content_type.startswith(a) for a in accept):
                            raise InvalidRequestError(f"the server sent {content_type}, not {' or '.join(accept)}")
                        declared = response.headers.get("content-length")
                        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                            raise InvalidRequestError(f"the file is {int(declared)} bytes, more than the {max_bytes} accepted")
                        inflater = _Inflater(response.headers.get("content-encoding", ""))
                        chunks: list[bytes] = []
                        size = 0
                        async for raw in response.aiter_raw():
                            for chunk in inflater.pieces(raw):
                                size += len(chunk)
                                if size > max_bytes:
                                    raise InvalidRequestError(f"the file is larger than the {max_bytes} bytes accepted")
                                chunks.append(chunk)
                        return Fetched(b"".join(chunks), content_type)
                raise InvalidRequestError(f"more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise InvalidRequestError("fetching the URL timed out") from None
    except httpx.InvalidURL as error:  # not an HTTPError: what httpx will not send (too long, control characters)
        raise InvalidRequestError(f"the URL cannot be requested as written: {error}") from None
    except httpx.HTTPError as error:
        raise InvalidRequestError(f"the URL could not be fetched ({type(error).__name__})") from None


async def fetch_all(
    urls: Iterable[tuple[str, str]], policy: UrlPolicy, max_bytes: int, accept: Iterable[str] = ("image/",), parallel: int = 8
) -> dict[str, bytes]:
    """Fetch every ``(url, where)`` at once (a few at a time); an error names where the URL sat."""
    wanted = dict((url, where) for url, where in urls)
    if not wanted:
        return {}
    gate = asyncio.Semaphore(parallel)
    accepted = tuple(accept)

    async def one(url: str, where: str) -> tuple[str, bytes]:
        async with gate:
            try:
                return url, (await fetch(url, policy, max_bytes, accepted)).data
            except InvalidRequestError as error:
                raise InvalidRequestError(f"{where}: {error.message}") from None

    return dict(await asyncio.gather(*(one(u, w) for u, w in wanted.items())))
