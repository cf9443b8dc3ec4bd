"""The versioned schema: a database made by an older version is brought up to date, rows kept."""

import asyncio

import pytest
import sqlalchemy as sa

from localvl.errors import ServiceUnavailableError
from localvl.store import database as db


def test_an_old_database_is_migrated_in_place(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with engine.begin() as connection:  # what version 1 of localvl left behind
        db.schema_version.create(connection)
        db.MIGRATIONS[0](connection)
        connection.execute(db.schema_version.insert().values(version=1))
        connection.execute(sa.text("INSERT INTO files VALUES ('file_1', '', 'a.png', 'image/png', 3, 'ab', '2026-01-01 00:00:00')"))
    engine.dispose()

    async def upgrade():
        database = db.Database(url)
        version = await database.start()
        again = await database.start()  # idempotent
        async with database.engine.connect() as connection:
            rows = (await connection.execute(sa.select(db.files))).mappings().all()
            versions = (await connection.execute(sa.select(db.schema_version.c.version))).scalars().all()
        await database.stop()
        return version, again, rows, versions

    version, again, rows, versions = asyncio.run(upgrade())
    assert version == again == len(db.MIGRATIONS)
    assert sorted(versions) == list(range(1, len(db.MIGRATIONS) + 1))
    assert [(r["id"], r["filename"], r["expires_at"]) for r in rows] == [("file_1", "a.png", None)]


def test_a_fresh_database_gets_every_version(tmp_path):
    async def fresh():
        database = db.Database(db.default_url(tmp_path / "data"))
        version = await database.start()
        await database.stop()
        return version

    assert asyncio.run(fresh()) == len(db.MIGRATIONS)
    assert (tmp_path / "data" / "localvl.db").is_file()


def test_every_backend_starts_at_the_latest_version(database_url):
    async def start():
        database = db.Database(database_url)
        version = await database.start()
        again = await database.start()
        await database.stop()
        return version, again

    assert asyncio.run(start()) == (len(db.MIGRATIONS), len(db.MIGRATIONS))


def test_servers_starting_together_on_one_fresh_database_all_start(database_url):
    # several servers of one deployment start at once on a new database: one migrates, the others
    # wait for it and find the schema made, none fails on a table or version row the other made
    async def start_together():
        databases = [db.Database(database_url) for _ in range(4)]
        try:
            return await asyncio.gather(*(database.start() for database in databases), return_exceptions=True)
        finally:
            for database in databases:
                await database.stop()

    assert asyncio.run(start_together()) == [len(db.MIGRATIONS)] * 4


def test_a_database_that_cannot_be_reached_is_a_503_to_retry_not_a_500():
    """Connection refused: the server's trouble; SDKs retry a 503 (with stored keys, every route needs the store)."""
    database = db.Database("postgresql+asyncpg://user:secret@127.0.0.1:1/nowhere")

    async def body():
        try:
            with pytest.raises(ServiceUnavailableError) as refused:
                await database.start()
            assert refused.value.headers == {"retry-after": "5"} and "secret" not in refused.value.message
            with pytest.raises(OSError):  # an OSError of the caller's own work inside the block stays what it is
                async with db.Database("sqlite+aiosqlite://").connect():
                    raise FileNotFoundError("the caller's")
        finally:
            await database.stop()

    asyncio.run(body())
