"""Who a request is: static keys, stored keys (cached for a few seconds), JWTs, or nobody."""

import asyncio
import time

import jwt
import pytest

from localvl.errors import AuthenticationError
from localvl.security.authenticator import Authenticator
from localvl.security.keys import ANONYMOUS, Limits
from localvl.security.tokens import TokenVerifier
from localvl.settings import Settings
from localvl.store.lazy import LazyStore


def run(coroutine):
    return asyncio.run(coroutine)


def test_no_authentication_configured_means_everyone_is_anonymous(tmp_path):
    store = LazyStore(Settings(data_dir=tmp_path))
    auth = Authenticator([], store)
    assert run(auth.identify([])) is ANONYMOUS and run(auth.identify(["anything"])) is ANONYMOUS
    assert not (tmp_path / "localvl.db").exists()  # asking did not create a store


def test_static_keys_get_the_default_limits_and_a_name_that_is_not_the_key():
    auth = Authenticator(["sk-one", "sk-two"], None, default_limits=Limits(rpm=3))
    one = run(auth.identify(["sk-one"]))
    assert one.name.startswith("static-") and "sk-one" not in one.name and one.limits == Limits(rpm=3)
    assert run(auth.identify(["wrong", "sk-two"])).owner != one.owner  # the first valid credential counts
    with pytest.raises(AuthenticationError, match="required"):
        run(auth.identify([]))
    with pytest.raises(AuthenticationError, match="invalid"):
        run(auth.identify(["sk-three"]))


def test_stored_keys_work_until_revoked_within_the_cache_time(tmp_path):
    async def body():
        store = LazyStore(Settings(data_dir=tmp_path))
        keys = await store.keys()
        auth = Authenticator([], store, default_limits=Limits(rpm=100, otpm=7), ttl=0.2)
        assert await auth.identify(["whatever"]) is ANONYMOUS  # a store with no keys: still open
        record, key = await keys.create("svc", Limits(rpm=5))
        await asyncio.sleep(0.25)
        identity = await auth.identify([key])
        assert identity.name == "svc" and identity.owner == record.owner
        assert identity.limits == Limits(rpm=5, otpm=7)  # its own limits over the server's
        with pytest.raises(AuthenticationError):
            await auth.identify([])
        await keys.revoke(record.id)
        assert (await auth.identify([key])).name == "svc"  # cached for ttl
        await asyncio.sleep(0.25)
        with pytest.raises(AuthenticationError):  # revoking the last key locks the server, never opens it
            await auth.identify([key])
        await store.stop()

    run(body())


def test_jwts_and_keys_side_by_side():
    secret = "k" * 32
    auth = Authenticator(["sk-static"], None, TokenVerifier(secret=secret))
    good = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    assert run(auth.identify([good])).name == "jwt:carol"
    assert run(auth.identify(["sk-static"])).name.startswith("static-")
    expired = jwt.encode({"sub": "carol", "exp": int(time.time()) - 600}, secret, algorithm="HS256")
    with pytest.raises(AuthenticationError, match="expired"):
        run(auth.identify([expired]))
