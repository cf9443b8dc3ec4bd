"""The SQL store: SQLite in the data directory by default, any SQLAlchemy async URL otherwise
(``postgresql+asyncpg://…`` where several servers share one database).

The schema is versioned: ``MIGRATIONS`` is an append-only list of steps, and ``start`` applies the
ones a database has not seen, in order, recording each in ``schema_version`` — so a schema change
never needs a wiped database.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

logger = logging.getLogger(__name__)

metadata = sa.MetaData()

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),  # the API key's identity ("" when open)
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("mime_type", sa.String(255), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),  # version 2
)

schema_version = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, primary_key=True))


def _v1(connection: Connection) -> None:
    connection.execute(sa.text(
        "CREATE TABLE IF NOT EXISTS files (id VARCHAR(64) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
        "filename VARCHAR(512) NOT NULL, mime_type VARCHAR(255) NOT NULL, size_bytes BIGINT NOT NULL, "
        "sha256 VARCHAR(64) NOT NULL, created_at TIMESTAMP WITH TIME ZONE NOT NULL)"
    ))
    connection.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_files_owner ON files (owner)"))
    connection.execute(sa.text("CREATE INDEX IF NOT EXISTS ix_files_created_at ON files (created_at)"))


def _v2(connection: Connection) -> None:
    connection.execute(sa.text("ALTER TABLE files ADD COLUMN expires_at TIMESTAMP WITH TIME ZONE"))


# Append only: a released step is never edited, a change is a new step. Steps are plain DDL, not
# ``metadata.create_all``, so each one creates exactly what its version had.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2]


def default_url(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{data_dir / 'localvl.db'}"


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: AsyncEngine = create_async_engine(url)

    async def start(self) -> int:
        """Bring the schema up to date; returns the version it is at."""
        async with self.engine.begin() as connection:
            return await connection.run_sync(_migrate)

    async def stop(self) -> None:
        await self.engine.dispose()


def _migrate(connection: Connection) -> int:
    schema_version.create(connection, checkfirst=True)
    current = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    for version, step in enumerate(MIGRATIONS, start=1):
        if version > current:
            logger.info("database schema: applying version %d", version)
            step(connection)
            connection.execute(schema_version.insert().values(version=version))
    return len(MIGRATIONS)
