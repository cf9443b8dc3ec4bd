"""The store's tests run on SQLite always, and on PostgreSQL where one is reachable: `.ci/run`
starts one (`.ci/postgres`) and names it in LOCALVL_TEST_POSTGRES_URL."""

from __future__ import annotations

import asyncio
import os
import secrets

import pytest

POSTGRES = os.environ.get("LOCALVL_TEST_POSTGRES_URL")


def fresh_postgres_database() -> tuple[str, str]:
    """(url of a new empty database, its name) on the test PostgreSQL server."""
    import asyncpg

    name = "t_" + secrets.token_hex(6)
    plain = POSTGRES.replace("postgresql+asyncpg://", "postgresql://")  # type: ignore[union-attr]

    async def create() -> None:
        connection = await asyncpg.connect(plain)
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()

    asyncio.run(create())
    return POSTGRES.rsplit("/", 1)[0] + "/" + name, name  # type: ignore[union-attr]


def drop_postgres_database(name: str) -> None:
    import asyncpg

    async def drop() -> None:
        connection = await asyncpg.connect(POSTGRES.replace("postgresql+asyncpg://", "postgresql://"))  # type: ignore[union-attr]
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()

    asyncio.run(drop())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'localvl.db'}"
        return
    if not POSTGRES:
        pytest.skip("no PostgreSQL server (set LOCALVL_TEST_POSTGRES_URL; .ci/run starts one)")
    url, name = fresh_postgres_database()
    yield url
    drop_postgres_database(name)
