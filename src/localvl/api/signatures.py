"""Signatures of thinking blocks: proof that a block sent back was written by this server.

A signature is an HMAC-SHA256 of the thinking text under a server key, so a client that returns
its history gets its thinking re-rendered exactly, and one that edits it gets a 400. The key is
``--thinking-key`` when given, else a random one kept in the cache directory (so signatures
survive restarts, and servers that share the directory or the setting accept each other's).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import zlib
from pathlib import Path


EMBEDDED = "lvl1."  # a signature that carries its (compressed) thinking
# The most an embedded signature may unpack to. Its MAC covers the thinking, so it can only be
# checked after unpacking: without a cap, a few hundred KB of compressed zeros in a forged
# signature unpack to gigabytes. Thinking this server wrote (at most a context of tokens) is far below.
MAX_EMBEDDED_BYTES = 8 << 20


class ThinkingSigner:
    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("the thinking-signature key must have at least 16 bytes")
        self._key = key

    @classmethod
    def from_settings(cls, key: str | None, cache_dir: Path) -> ThinkingSigner:
        if key:
            return cls(key.encode())
        return cls(_stored_key(cache_dir / "thinking.key"))

    def _mac(self, thinking: str) -> bytes:
        return hmac.new(self._key, thinking.encode(), hashlib.sha256).digest()

    def sign(self, thinking: str, embed: bool = False) -> str:
        """The signature of ``thinking``. ``embed``: the thinking itself travels inside it (for
        ``display: omitted``, where the client sees an empty block but must be able to send it back)."""
        mac = base64.b64encode(self._mac(thinking)).decode()
        if not embed:
            return mac
        packed = base64.b64encode(zlib.compress(thinking.encode())).decode()
        return f"{EMBEDDED}{packed}.{mac}"

    def recover(self, thinking: str, signature: str | None) -> str | None:
        """The thinking a block sent back stands for, or None if its signature does not hold."""
        if not signature:
            return None
        if signature.startswith(EMBEDDED):
            try:
                packed, mac = signature[len(EMBEDDED) :].split(".", 1)
                embedded = _unpack(base64.b64decode(packed, validate=True))
            except (ValueError, zlib.error, UnicodeDecodeError):
                return None
            if embedded is None:
                return None
            if thinking and thinking != embedded:
                return None
            thinking, signature = embedded, mac
        try:
            given = base64.b64decode(signature, validate=True)
        except ValueError:
            return None
        return thinking if hmac.compare_digest(self._mac(thinking), given) else None


def _unpack(packed: bytes) -> str | None:
    """The text a signature carries, or None past ``MAX_EMBEDDED_BYTES`` (or a truncated stream)."""
    inflater = zlib.decompressobj()
    data = inflater.decompress(packed, MAX_EMBEDDED_BYTES)
    if inflater.unconsumed_tail or not inflater.eof:
        return None
    return data.decode()


def _stored_key(path: Path) -> bytes:
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.hex())
    os.replace(temporary, path)  # atomic: two servers starting together end up with one key
    return bytes.fromhex(path.read_text().strip())
