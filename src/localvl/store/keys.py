"""API keys kept in the SQL store: hashed, named, with limits, revoked rather than deleted."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa

from localvl.security.keys import Limits, key_hash, key_hint, new_key
from localvl.store.database import Database, api_keys, utc


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    hint: str
    limits: Limits
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def owner(self) -> str:
        """The identity files and batches belong to: stable across renames, never the key."""
        return "key:" + self.id


def _record(row: sa.Row) -> KeyRecord:
    return KeyRecord(row.id, row.name, row.hint, Limits(row.rpm, row.itpm, row.otpm, row.max_streams),
                     utc(row.created_at), utc(row.revoked_at))  # type: ignore[arg-type]


class KeyStore:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def create(self, name: str, limits: Limits = Limits()) -> tuple[KeyRecord, str]:
        """A new key: its record, and the key itself — shown once, never kept."""
        from localvl.api.middleware import new_id

        key = new_key()
        values = dict(id=new_id("key_"), name=name, key_hash=key_hash(key), hint=key_hint(key), rpm=limits.rpm,
                      itpm=limits.itpm, otpm=limits.otpm, max_streams=limits.max_streams,
                      created_at=dt.datetime.now(dt.timezone.utc), revoked_at=None)
        async with self.database.begin() as connection:
            await connection.execute(api_keys.insert().values(**values))
        return KeyRecord(values["id"], name, values["hint"], limits, values["created_at"], None), key

    async def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.database.connect() as connection:
            return [_record(row) for row in (await connection.execute(query)).all()]

    async def revoke(self, id_or_name: str) -> list[KeyRecord]:
        """Revoke the key with this id, or every active key with this name; the ones revoked."""
        now = dt.datetime.now(dt.timezone.utc)
        match = sa.or_(api_keys.c.id == id_or_name, api_keys.c.name == id_or_name)
        async with self.database.begin() as connection:
            rows = (await connection.execute(sa.select(api_keys).where(match, api_keys.c.revoked_at.is_(None)))).all()
            if rows:
                await connection.execute(
                    api_keys.update().where(api_keys.c.id.in_([row.id for row in rows])).values(revoked_at=now)
                )
        return [_record(row) for row in rows]

    async def find(self, key: str) -> KeyRecord | None:
        """The active key's record, or None (unknown or revoked)."""
        query = sa.select(api_keys).where(api_keys.c.key_hash == key_hash(key), api_keys.c.revoked_at.is_(None))
        async with self.database.connect() as connection:
            row = (await connection.execute(query)).first()
        return _record(row) if row is not None else None

    async def count(self, include_revoked: bool = False) -> int:
        query = sa.select(sa.func.count()).select_from(api_keys)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        async with self.database.connect() as connection:
            return int((await connection.execute(query)).scalar() or 0)
