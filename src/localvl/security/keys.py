"""API keys and who they stand for: how keys are made and hashed, and the identity a request runs as."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

KEY_PREFIX = "sk-localvl-"


def new_key() -> str:
    """A fresh key: 256 random bits, so a plain SHA-256 is a safe way to keep it (no slow hash is
    needed against guessing, unlike a password)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_hint(key: str) -> str:
    """Enough of a key to recognise it in a list, not enough to matter."""
    return key[: len(KEY_PREFIX) + 4] + "…"


@dataclass(frozen=True)
class Limits:
    """Per-key limits; None means unlimited. Requests, input and output tokens are per minute."""

    rpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    max_streams: int | None = None

    def over(self, fallback: Limits) -> Limits:
        """These limits, with ``fallback``'s where these set none."""
        return Limits(
            self.rpm if self.rpm is not None else fallback.rpm,
            self.itpm if self.itpm is not None else fallback.itpm,
            self.otpm if self.otpm is not None else fallback.otpm,
            self.max_streams if self.max_streams is not None else fallback.max_streams,
        )


@dataclass(frozen=True)
class Identity:
    """Who a request runs as. ``owner`` is what files and batches belong to and what limits are
    counted against (a hash, never a secret); ``name`` is what logs show."""

    owner: str
    name: str
    limits: Limits = Limits()


# A server with no authentication configured: everyone is this one identity.
ANONYMOUS = Identity(owner="", name="")
