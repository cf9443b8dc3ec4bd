"""Who a request is: static keys (flags or environment), keys kept in the SQL store, or JWTs.

Stored keys are looked up by hash and the answer kept for ``ttl`` seconds, so a busy server does
not query the database per request and a revoked key stops working within ``ttl`` everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import TYPE_CHECKING, Sequence

from localvl.errors import AuthenticationError
from localvl.security.keys import ANONYMOUS, Identity, Limits, key_hash
from localvl.security.tokens import TokenVerifier, looks_like_jwt

if TYPE_CHECKING:
    from localvl.store.keys import KeyRecord
    from localvl.store.lazy import LazyStore

_CACHE_ENTRIES = 10_000


def static_identity(key: str, limits: Limits) -> Identity:
    # The owner is the key's hash prefix: what files and batches of static keys have always used.
    digest = hashlib.sha256(key.encode()).hexdigest()
    return Identity(owner=digest[:32], name="static-" + digest[:8], limits=limits)


class Authenticator:
    def __init__(
        self,
        static_keys: Sequence[str],
        store: LazyStore | None,
        verifier: TokenVerifier | None = None,
        default_limits: Limits = Limits(),
        ttl: float = 5.0,
    ) -> None:
        self.static_keys = [key for key in static_keys if key]
        self.store = store
        self.verifier = verifier
        self.default_limits = default_limits
        self.ttl = ttl
        self._found: dict[str, tuple[KeyRecord | None, float]] = {}
        self._stored_count: tuple[int, float] = (0, float("-inf"))

    async def stored_keys(self) -> int:
        """Keys ever made in the store, revoked ones too: revoking the last key locks the server
        rather than opening it (0 without a store, never creating one just to ask)."""
        if self.store is None or not self.store.opened:
            return 0
        count, at = self._stored_count
        if time.monotonic() - at > self.ttl:
            count = await (await self.store.keys()).count(include_revoked=True)
            self._stored_count = (count, time.monotonic())
        return count

    async def configured(self) -> bool:
        return bool(self.static_keys) or self.verifier is not None or await self.stored_keys() > 0

    async def identify(self, presented: Sequence[str]) -> Identity:
        """The identity of the first valid credential presented; ``AuthenticationError`` when none is
        valid; ``ANONYMOUS`` when no authentication is configured."""
        if not await self.configured():
            return ANONYMOUS
        if not presented:
            raise AuthenticationError("x-api-key header is required")
        for credential in presented:
            if self.verifier is not None and looks_like_jwt(credential):
                return self.verifier.identify(credential)
            identity = self._static(credential) or await self._stored(credential)
            if identity is not None:
                return identity
        raise AuthenticationError("invalid x-api-key")

    def _static(self, key: str) -> Identity | None:
        # Compare against every key so timing does not tell which one nearly matched.
        matched = False
        for candidate in self.static_keys:
            matched |= hmac.compare_digest(key.encode(), candidate.encode())
        return static_identity(key, self.default_limits) if matched else None

    async def _stored(self, key: str) -> Identity | None:
        if await self.stored_keys() == 0:
            return None
        digest = key_hash(key)
        record, at = self._found.get(digest, (None, float("-inf")))
        if time.monotonic() - at > self.ttl:
            assert self.store is not None
            record = await (await self.store.keys()).find(key)
            if len(self._found) >= _CACHE_ENTRIES:
                self._found.clear()  # a flood of wrong keys must not grow memory
            self._found[digest] = (record, time.monotonic())
        if record is None:
            return None
        return Identity(owner=record.owner, name=record.name, limits=record.limits.over(self.default_limits))
