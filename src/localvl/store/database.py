"""The SQL store: SQLite in the data directory by default, any SQLAlchemy async URL otherwise
(``postgresql+asyncpg://…`` where several servers share one database).

The schema is versioned: ``MIGRATIONS`` is an append-only list of steps, and ``start`` applies the
ones a database has not seen, in order, recording each in ``schema_version`` — so a schema change
never needs a wiped database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from localvl.errors import ServiceUnavailableError

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

batches = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("owner", sa.String(64), nullable=False, index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("cancel_initiated_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("archived_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("total", sa.Integer, nullable=False),
)

batch_requests = sa.Table(
    "batch_requests",
    metadata,
    sa.Column("batch_id", sa.String(64), primary_key=True),
    sa.Column("position", sa.Integer, primary_key=True),
    sa.Column("custom_id", sa.String(64), nullable=False),
    sa.Column("params", sa.Text, nullable=False),  # the request's JSON, as sent
    # pending -> running -> succeeded | errored; pending -> canceled | expired
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("result", sa.Text, nullable=True),  # the result's JSON, once there is one
    sa.Column("claimed_by", sa.String(64), nullable=True),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("key_hash", sa.String(64), nullable=False, unique=True),  # sha256 of the key: the key itself is never kept
    sa.Column("hint", sa.String(32), nullable=False),  # the key's first characters, to recognise it in a list
    sa.Column("rpm", sa.Integer, nullable=True),  # None: no limit
    sa.Column("itpm", sa.Integer, nullable=True),
    sa.Column("otpm", sa.Integer, nullable=True),
    sa.Column("max_streams", sa.Integer, nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
)

# The bytes of uploaded files, where several servers share the database (version 5): pieces of
# at most a mebibyte, so none is read or written whole.
file_chunks = sa.Table(
    "file_chunks",
    metadata,
    sa.Column("file_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
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


def _v3(connection: Connection) -> None:
    connection.execute(sa.text(
        "CREATE TABLE batches (id VARCHAR(64) PRIMARY KEY, owner VARCHAR(64) NOT NULL, "
        "created_at TIMESTAMP WITH TIME ZONE NOT NULL, expires_at TIMESTAMP WITH TIME ZONE NOT NULL, "
        "cancel_initiated_at TIMESTAMP WITH TIME ZONE, ended_at TIMESTAMP WITH TIME ZONE, "
        "archived_at TIMESTAMP WITH TIME ZONE, total INTEGER NOT NULL)"
    ))
    connection.execute(sa.text("CREATE INDEX ix_batches_owner ON batches (owner)"))
    connection.execute(sa.text("CREATE INDEX ix_batches_created_at ON batches (created_at)"))
    connection.execute(sa.text(
        "CREATE TABLE batch_requests (batch_id VARCHAR(64) NOT NULL, position INTEGER NOT NULL, "
        "custom_id VARCHAR(64) NOT NULL, params TEXT NOT NULL, status VARCHAR(16) NOT NULL, result TEXT, "
        "claimed_by VARCHAR(64), claimed_at TIMESTAMP WITH TIME ZONE, attempts INTEGER NOT NULL DEFAULT 0, "
        "PRIMARY KEY (batch_id, position))"
    ))
    connection.execute(sa.text("CREATE INDEX ix_batch_requests_status ON batch_requests (status)"))


def _v4(connection: Connection) -> None:
    connection.execute(sa.text(
        "CREATE TABLE api_keys (id VARCHAR(64) PRIMARY KEY, name VARCHAR(255) NOT NULL, "
        "key_hash VARCHAR(64) NOT NULL UNIQUE, hint VARCHAR(32) NOT NULL, rpm INTEGER, itpm INTEGER, otpm INTEGER, "
        "max_streams INTEGER, created_at TIMESTAMP WITH TIME ZONE NOT NULL, revoked_at TIMESTAMP WITH TIME ZONE)"
    ))


def _v5(connection: Connection) -> None:
    blob = "BYTEA" if connection.dialect.name == "postgresql" else "BLOB"
    connection.execute(sa.text(
        f"CREATE TABLE file_chunks (file_id VARCHAR(64) NOT NULL, seq INTEGER NOT NULL, data {blob} NOT NULL, "
        "PRIMARY KEY (file_id, seq))"
    ))


# Append only: a released step is never edited, a change is a new step. Steps are plain DDL, not
# ``metadata.create_all``, so each one creates exactly what its version had.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5]


def utc(value: dt.datetime | None) -> dt.datetime | None:
    """A stored time as UTC: SQLite keeps no zone, and the store writes UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value


def newest_first(
    query: sa.Select[Any], table: sa.Table, anchor: tuple[dt.datetime, str] | None, older: bool, limit: int
) -> sa.Select[Any]:
    """Anthropic's paging over ``(created_at, id)``: ``older`` pages after ``anchor`` (newest
    first); otherwise before it, read oldest first (the caller reverses that page). One row more
    than ``limit`` is read, to tell whether there are more."""
    key = sa.tuple_(table.c.created_at, table.c.id)
    order = [table.c.created_at.desc(), table.c.id.desc()]
    if anchor is not None:
        bound = sa.tuple_(sa.literal(anchor[0]), sa.literal(anchor[1]))
        if older:
            query = query.where(key < bound)
        else:
            query, order = query.where(key > bound), [table.c.created_at.asc(), table.c.id.asc()]
    return query.order_by(*order).limit(limit + 1)


def default_url(data_dir: Path) -> str:
    data_dir.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{data_dir / 'localvl.db'}"


def _dropped(context: Any) -> None:
    """A connection lost mid-query: the database's trouble, not the request's (see ``Database.begin``)."""
    if context.is_disconnect:
        logger.error("the database connection was lost (%s)", type(context.original_exception).__name__)
        raise _unavailable() from context.original_exception


def _unavailable() -> ServiceUnavailableError:
    return ServiceUnavailableError("the database is unreachable; retry shortly", headers={"retry-after": "5"})


@contextlib.asynccontextmanager
async def _reached(opening: Any) -> AsyncIterator[AsyncConnection]:
    """``opening`` entered, a failure to connect turned into ``_unavailable()``; the block's own errors pass."""
    async with contextlib.AsyncExitStack() as stack:
        try:
            connection = await stack.enter_async_context(opening)
        except OSError as error:
            logger.error("the database is unreachable (%s)", type(error).__name__)
            raise _unavailable() from error
        yield connection


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        sqlite = url.startswith("sqlite")
        self.engine: AsyncEngine = create_async_engine(url, connect_args={"timeout": 30} if sqlite else {})
        if sqlite:
            # Readers never wait on the writer, and a writer waits (not fails) for another.
            @sa.event.listens_for(self.engine.sync_engine, "connect")
            def _pragmas(connection: Any, _record: Any) -> None:
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.close()
        sa.event.listen(self.engine.sync_engine, "handle_error", _dropped)

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction, committed at the end (``AsyncEngine.begin``).

        A database that cannot be reached (refused, unresolvable) is a 503 the SDKs retry, not a
        500 on every route that needs it (with stored keys, every route); only connecting is
        translated, so an OSError of the caller's own work inside the block stays what it is.
        """
        async with _reached(self.engine.begin()) as connection:
            yield connection

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[AsyncConnection]:
        """A connection without a transaction of its own (``AsyncEngine.connect``); as ``begin``."""
        async with _reached(self.engine.connect()) as connection:
            yield connection

    async def start(self) -> int:
        """Bring the schema up to date; returns the version it is at."""
        async with self.begin() as connection:
            return await connection.run_sync(_migrate)

    async def stop(self) -> None:
        await self.engine.dispose()


# Any fixed number: the PostgreSQL advisory lock that servers migrating one database queue on.
_MIGRATION_LOCK = 0x6C6F63616C766C


def _migrate(connection: Connection) -> int:
    # Servers of one deployment start together: the first to get here migrates while the others
    # wait, then find the schema made (without the lock, both create it and one fails to start).
    dialect = connection.dialect.name
    if dialect == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
    elif dialect == "sqlite":  # the write lock now, not at the first write (pysqlite begins late)
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    schema_version.create(connection, checkfirst=True)
    current = connection.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
    for version, step in enumerate(MIGRATIONS, start=1):
        if version > current:
            logger.info("database schema: applying version %d", version)
            step(connection)
            connection.execute(schema_version.insert().values(version=version))
    return len(MIGRATIONS)
