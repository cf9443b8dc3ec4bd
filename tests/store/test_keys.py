"""API keys in the store on each backend: hashed at rest, found by key, revoked by id or name."""

import asyncio

import sqlalchemy as sa

from localvl.security.keys import KEY_PREFIX, Limits
from localvl.store.database import Database, api_keys
from localvl.store.keys import KeyStore


def test_keys_on_every_backend(database_url):
    async def body():
        database = Database(database_url)
        await database.start()
        store = KeyStore(database)
        try:
            record, key = await store.create("ci-bot", Limits(rpm=10, otpm=500))
            assert key.startswith(KEY_PREFIX) and len(key) > 40
            assert record.id.startswith("key_") and record.owner == "key:" + record.id
            async with database.engine.connect() as connection:
                stored = " ".join(str(v) for row in (await connection.execute(sa.select(api_keys))).all() for v in row)
            assert key not in stored and key[len(KEY_PREFIX) + 4 :] not in stored  # only a hash and a hint
            found = await store.find(key)
            assert found is not None and found.id == record.id and found.limits == Limits(rpm=10, otpm=500)
            assert await store.find(key + "x") is None
            other, other_key = await store.create("ci-bot", Limits())
            third, _ = await store.create("human", Limits())
            assert await store.count() == 3
            assert [r.name for r in await store.list()] == ["ci-bot", "ci-bot", "human"]
            assert [r.id for r in await store.revoke("ci-bot")] == [record.id, other.id]  # by name: every one
            assert await store.find(key) is None and await store.find(other_key) is None
            assert await store.revoke("ci-bot") == []
            assert [r.id for r in await store.revoke(third.id)] == [third.id]  # by id
            assert await store.count() == 0 and await store.count(include_revoked=True) == 3
            everything = await store.list(include_revoked=True)
            assert len(everything) == 3 and all(r.revoked_at is not None for r in everything)
        finally:
            await database.stop()

    asyncio.run(body())
