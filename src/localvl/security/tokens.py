"""JWT bearer tokens as an alternative to API keys: verified with an HS256 secret, or an RS256/ES256
public key (PEM) or JWKS file; ``exp`` is required and ``nbf``/``aud``/``iss`` checked (without
``--jwt-audience``, a token naming any audience is refused: it was made for another service). The token's
``sub`` becomes the identity its files, batches and limits belong to."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from localvl.errors import AuthenticationError
from localvl.security.keys import Identity, Limits

ASYMMETRIC = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]


def looks_like_jwt(token: str) -> bool:
    """Three base64url parts whose header names an algorithm: a JWT, not an API key."""
    import jwt

    if token.count(".") != 2:
        return False
    try:
        return "alg" in jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return False


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: str | None = None,
        public_key: Path | None = None,
        jwks_file: Path | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        limits: Limits = Limits(),
        leeway: float = 30.0,
    ) -> None:
        import jwt

        if sum(x is not None for x in (secret, public_key, jwks_file)) != 1:
            raise ValueError("JWT: give exactly one of --jwt-secret, --jwt-public-key, --jwt-jwks-file")
        self._keys: dict[str | None, tuple[Any, list[str]]] = {}  # kid -> (key, algorithms)
        if secret is not None:
            if len(secret) < 32:
                raise ValueError("JWT: --jwt-secret must be at least 32 characters")
            self._keys[None] = (secret, ["HS256"])
        elif public_key is not None:
            self._keys[None] = _public_key(public_key)
        else:
            assert jwks_file is not None
            try:
                keys = jwt.PyJWKSet.from_dict(json.loads(jwks_file.read_text())).keys
            except (OSError, ValueError, jwt.PyJWTError) as error:  # a ValueError is what serve reports
                raise ValueError(f"JWT: cannot read the JWKS file {jwks_file}: {error}") from None
            for entry in keys:
                self._keys[entry.key_id] = (entry.key, [entry.algorithm_name] if entry.algorithm_name else ASYMMETRIC)
        self.audience = audience
        self.issuer = issuer
        self.limits = limits
        self.leeway = leeway

    def identify(self, token: str) -> Identity:
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
            key, algorithms = self._keys.get(kid) or self._keys.get(None) or (None, [])
            if key is None:
                raise AuthenticationError("invalid bearer token: unknown key id")
            claims = jwt.decode(
                token, key, algorithms=algorithms, audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("invalid bearer token: expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("invalid bearer token: not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            if self.audience is None:
                # A token minted for another service of the same issuer must not open this one.
                raise AuthenticationError("invalid bearer token: it names an audience (aud) and this server "
                                          "accepts none; configure --jwt-audience") from None
            raise AuthenticationError("invalid bearer token: wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("invalid bearer token: wrong issuer") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthenticationError(f"invalid bearer token: no {error.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthenticationError("invalid bearer token") from None
        subject = str(claims["sub"])
        digest = hashlib.sha256(f"{claims.get('iss', '')}\0{subject}".encode()).hexdigest()[:32]
        return Identity(owner="jwt:" + digest, name="jwt:" + subject[:64], limits=self.limits)


def _public_key(path: Path) -> tuple[Any, list[str]]:
    """A PEM public key and the algorithms that key type can verify."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ValueError(f"JWT: cannot read the public key {path}: {error}") from None
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key, ["ES256", "ES384", "ES512"]
    raise ValueError(f"JWT: {path} is neither an RSA nor an EC public key")
