"""JWT bearer tokens: HS256 secrets, RS256/ES256 public keys and JWKS files; every claim check."""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from localvl.errors import AuthenticationError
from localvl.security.keys import Limits
from localvl.security.tokens import TokenVerifier, looks_like_jwt

SECRET = "s" * 40


def token(claims=None, key=SECRET, algorithm="HS256", **headers):
    payload = {"sub": "alice", "exp": int(time.time()) + 60}
    payload.update(claims or {})
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


def test_a_valid_hs256_token_names_its_subject():
    identity = TokenVerifier(secret=SECRET, limits=Limits(rpm=5)).identify(token())
    assert identity.name == "jwt:alice" and identity.owner.startswith("jwt:") and "alice" not in identity.owner
    assert identity.limits == Limits(rpm=5)
    other = TokenVerifier(secret=SECRET).identify(token({"sub": "bob"}))
    assert other.owner != identity.owner


@pytest.mark.parametrize(
    "claims, reason",
    [
        ({"exp": -120}, "expired"),  # seconds from now, made when the test runs
        ({"nbf": 120}, "not valid yet"),
        ({"exp": None}, "no exp claim"),
        ({"sub": None}, "no sub claim"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"iss": "elsewhere"}, "wrong issuer"),
    ],
)
def test_claims_are_checked(claims, reason):
    verifier = TokenVerifier(secret=SECRET, audience="localvl", issuer="https://idp.example")
    good = {"aud": "localvl", "iss": "https://idp.example"}
    verifier.identify(token(good))
    claims = {k: int(time.time()) + v if k in ("exp", "nbf") and v is not None else v for k, v in claims.items()}
    with pytest.raises(AuthenticationError) as raised:
        verifier.identify(token({**good, **claims}))
    assert reason in raised.value.message


def test_a_token_made_for_another_audience_is_refused_when_the_server_names_none():
    # The same issuer's token for another service (its aud) must not be replayable here.
    verifier = TokenVerifier(secret=SECRET)
    assert verifier.identify(token()).name == "jwt:alice"
    for audience in ("another-service", ["another-service", "a-third"]):
        with pytest.raises(AuthenticationError) as raised:
            verifier.identify(token({"aud": audience}))
        assert "--jwt-audience" in raised.value.message
    assert TokenVerifier(secret=SECRET, audience="localvl").identify(token({"aud": ["localvl", "x"]})).name == "jwt:alice"


def test_forged_or_unsigned_tokens_are_refused():
    verifier = TokenVerifier(secret=SECRET)
    with pytest.raises(AuthenticationError):
        verifier.identify(token(key="x" * 40))
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AuthenticationError):
        verifier.identify(unsigned)


def test_rs256_public_key_and_algorithm_confusion(tmp_path):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "key.pem").write_bytes(pem)
    verifier = TokenVerifier(public_key=tmp_path / "key.pem")
    assert verifier.identify(token(key=private, algorithm="RS256")).name == "jwt:alice"
    # The classic confusion attack: an HS256 token whose HMAC secret is the public key itself.
    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + b"." + b64(json.dumps({"sub": "eve", "exp": int(time.time()) + 60}).encode())
    forged = signing_input + b"." + b64(hmac.new(pem, signing_input, hashlib.sha256).digest())
    with pytest.raises(AuthenticationError):
        verifier.identify(forged.decode())


def test_jwks_file_picks_the_key_by_kid(tmp_path):
    first, second = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, private in (("one", first), ("two", second)):
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(private.public_key()))
        keys.append({**entry, "kid": kid, "alg": "ES256", "use": "sig"})
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": keys}))
    verifier = TokenVerifier(jwks_file=tmp_path / "jwks.json")
    assert verifier.identify(token(key=second, algorithm="ES256", kid="two")).name == "jwt:alice"
    with pytest.raises(AuthenticationError):
        verifier.identify(token(key=second, algorithm="ES256", kid="one"))
    with pytest.raises(AuthenticationError, match="unknown key id"):
        verifier.identify(token(key=second, algorithm="ES256", kid="three"))


def test_settings_problems_are_clear(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        TokenVerifier()
    with pytest.raises(ValueError, match="32 characters"):
        TokenVerifier(secret="short")
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ValueError, match="cannot read the public key"):
        TokenVerifier(public_key=tmp_path / "bad.pem")


def test_only_jwt_shaped_credentials_are_taken_for_tokens():
    assert looks_like_jwt(token())
    assert not looks_like_jwt("sk-localvl-abc") and not looks_like_jwt("a.b.c")


@pytest.mark.parametrize("content", [None, "not json", '{"keys": "nope"}', '{"keys": []}'])
def test_an_unusable_jwks_file_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match="JWKS file"):
        TokenVerifier(jwks_file=path)
