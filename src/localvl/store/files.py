"""Uploaded files: metadata in the SQL store; bytes on local disk under the data directory, or,
where the database is one several servers share (not SQLite), in the database too, in pieces, so
that a file uploaded to one server is read by every other (their data directories are their own).

A file belongs to the API key that uploaded it: another key cannot see, read or delete it (when no
keys are configured everything is one owner). Ids look like Anthropic's (``file_…``); listing is
newest first, paged by ``before_id``/``after_id`` as Anthropic pages it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, BinaryIO

import anyio

import sqlalchemy as sa

from localvl.errors import NotFoundError
from localvl.store.database import Database, file_chunks, files, newest_first, utc

_ALPHABET = string.ascii_letters + string.digits
CHUNK = 1 << 20
# The columns' lengths, in characters: PostgreSQL refuses longer values (SQLite would keep them).
MAX_FILENAME = files.c.filename.type.length
MAX_MIME_TYPE = files.c.mime_type.type.length


@dataclass(frozen=True)
class FileRecord:
    id: str
    owner: str
    filename: str
    mime_type: str
    size_bytes: int
    sha256: str
    created_at: dt.datetime
    expires_at: dt.datetime | None = None


class FileStore:
    def __init__(self, database: Database, directory: Path) -> None:
        self.database = database
        self.directory = directory
        self.in_database = database.engine.dialect.name != "sqlite"
        directory.mkdir(parents=True, exist_ok=True)
        self._sweep_parts()

    def _sweep_parts(self, older_than: float = 3600.0) -> None:
        """Half-written uploads of a server that was killed: never listed, but on disk for good.
        Only stale ones go, as another server sharing the directory may be writing one now."""
        cutoff = dt.datetime.now().timestamp() - older_than
        for part in self.directory.glob("*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:  # gone already, or not ours to remove
                pass

    async def sweep_orphans(self, older_than: float = 3600.0) -> int:
        """Whole files no row points at: a server killed between writing one and recording it, or
        between deleting a row and its bytes. Only stale ones, as another server sharing the
        directory may be between the two now. Returns how many went."""
        cutoff = dt.datetime.now().timestamp() - older_than

        def stale() -> list[str]:
            found = []
            for entry in self.directory.glob("file_*"):
                try:
                    if not entry.suffix and entry.stat().st_mtime < cutoff:
                        found.append(entry.name)
                except OSError:
                    pass
            return found

        names, removed = await anyio.to_thread.run_sync(stale), 0
        for start in range(0, len(names), 500):
            some = names[start : start + 500]
            async with self.database.connect() as connection:
                known = set((await connection.execute(sa.select(files.c.id).where(files.c.id.in_(some)))).scalars())
            for name in some:
                if name not in known:
                    self.path(name).unlink(missing_ok=True)
                    removed += 1
        return removed

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    async def create(
        self, owner: str, filename: str, mime_type: str, source: BinaryIO, expires_in: float | None = None
    ) -> FileRecord:
        """Store what ``source`` holds (read in pieces, in a worker thread) and record it."""
        file_id = "file_011" + "".join(secrets.choice(_ALPHABET) for _ in range(21))
        if self.in_database:
            return await self._create_in_database(file_id, owner, filename, mime_type, source, expires_in)
        size, digest = await anyio.to_thread.run_sync(self._write, file_id, source)
        now = dt.datetime.now(dt.timezone.utc)
        expires = None if expires_in is None else now + dt.timedelta(seconds=expires_in)
        record = FileRecord(file_id, owner, filename, mime_type, size, digest, now, expires)
        try:
            async with self.database.begin() as connection:
                await connection.execute(files.insert().values(**record.__dict__))
        except BaseException:  # no row will ever point at these bytes
            self.path(file_id).unlink(missing_ok=True)
            raise
        return record

    async def _create_in_database(
        self, file_id: str, owner: str, filename: str, mime_type: str, source: BinaryIO, expires_in: float | None
    ) -> FileRecord:
        # The pieces and the row in one transaction: a server killed mid-upload leaves nothing.
        digest, size, seq = hashlib.sha256(), 0, 0
        async with self.database.begin() as connection:
            while chunk := await anyio.to_thread.run_sync(source.read, CHUNK):
                digest.update(chunk)
                size += len(chunk)
                await connection.execute(file_chunks.insert().values(file_id=file_id, seq=seq, data=chunk))
                seq += 1
            now = dt.datetime.now(dt.timezone.utc)
            expires = None if expires_in is None else now + dt.timedelta(seconds=expires_in)
            record = FileRecord(file_id, owner, filename, mime_type, size, digest.hexdigest(), now, expires)
            await connection.execute(files.insert().values(**record.__dict__))
        return record

    def _write(self, file_id: str, source: BinaryIO) -> tuple[int, str]:
        temporary = self.path(file_id).with_suffix(".part")
        digest, size = hashlib.sha256(), 0
        with temporary.open("wb") as out:
            while chunk := source.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        os.replace(temporary, self.path(file_id))  # the row only ever points at whole files
        return size, digest.hexdigest()

    async def get(self, owner: str, file_id: str) -> FileRecord:
        async with self.database.connect() as connection:
            row = (await connection.execute(
                sa.select(files).where(files.c.id == file_id, files.c.owner == owner)
            )).mappings().first()
        if row is None:
            raise NotFoundError(f"file not found: {file_id}")
        record = _record(row)
        if record.expires_at is not None and record.expires_at <= dt.datetime.now(dt.timezone.utc):
            await self.delete(owner, file_id)
            raise NotFoundError(f"file not found: {file_id} (expired)")
        return record

    async def read(self, owner: str, file_id: str) -> tuple[FileRecord, bytes]:
        record = await self.get(owner, file_id)
        return record, b"".join([chunk async for chunk in self.content(record)])

    async def content(self, record: FileRecord) -> AsyncIterator[bytes]:
        """The file's bytes, a piece at a time. Raises NotFoundError before the first piece when
        they are not here (deleted meanwhile, or on another server's disk), and mid-way when they
        end short of the recorded size (deleted while being read): never a truncated file as whole."""
        sent = 0
        pieces = self._database_pieces(record.id) if self.in_database else None
        if pieces is not None:
            async for piece in pieces:
                sent += len(piece)
                yield piece
        if sent == 0:  # on disk: SQLite's, or uploaded before the database held the bytes
            async for piece in self._disk_pieces(record.id):
                sent += len(piece)
                yield piece
        if sent != record.size_bytes:
            raise NotFoundError(f"file not found: {record.id} (deleted while being read)")

    async def _database_pieces(self, file_id: str) -> AsyncIterator[bytes]:
        seq = 0
        while True:
            async with self.database.connect() as connection:
                piece = (await connection.execute(sa.select(file_chunks.c.data).where(
                    file_chunks.c.file_id == file_id, file_chunks.c.seq == seq))).scalar()
            if piece is None:
                return
            yield bytes(piece)
            seq += 1

    async def _disk_pieces(self, file_id: str) -> AsyncIterator[bytes]:
        try:
            handle = await anyio.to_thread.run_sync(self.path(file_id).open, "rb")
        except FileNotFoundError:
            raise NotFoundError(f"file not found: {file_id} (its bytes are not on this server)") from None
        try:
            while piece := await anyio.to_thread.run_sync(handle.read, CHUNK):
                yield piece
        finally:
            handle.close()

    async def page(
        self, owner: str, limit: int, before_id: str | None, after_id: str | None, ids: list[str] | None = None
    ) -> tuple[list[FileRecord], bool]:
        """Newest first: ``after_id`` pages to older files, ``before_id`` to newer ones; ``ids``: just these."""
        now = dt.datetime.now(dt.timezone.utc)
        query = sa.select(files).where(files.c.owner == owner, sa.or_(files.c.expires_at.is_(None), files.c.expires_at > now))
        if ids is not None:
            query = query.where(files.c.id.in_(ids))
        anchor = await self.get(owner, after_id or before_id or "") if (after_id or before_id) else None
        query = newest_first(query, files, anchor and (anchor.created_at, anchor.id), bool(after_id), limit)
        async with self.database.connect() as connection:
            rows = (await connection.execute(query)).mappings().all()
        records = [_record(row) for row in rows[:limit]]
        if before_id and not after_id:  # both given: after_id pages, as /v1/models does
            records.reverse()
        return records, len(rows) > limit

    async def delete(self, owner: str, file_id: str) -> None:
        async with self.database.begin() as connection:
            deleted = await connection.execute(files.delete().where(files.c.id == file_id, files.c.owner == owner))
            if deleted.rowcount and self.in_database:
                await connection.execute(file_chunks.delete().where(file_chunks.c.file_id == file_id))
        if deleted.rowcount == 0:
            raise NotFoundError(f"file not found: {file_id}")
        self.path(file_id).unlink(missing_ok=True)


    async def sweep_expired(self, limit: int = 1000) -> int:
        """Delete up to ``limit`` files whose expiry has passed; how many. Without it an expired
        file's bytes stayed (on disk or in the database) until someone asked for the file."""
        now = dt.datetime.now(dt.timezone.utc)
        async with self.database.connect() as connection:
            rows = (await connection.execute(
                sa.select(files.c.id, files.c.owner).where(files.c.expires_at <= now).limit(limit)
            )).all()
        swept = 0
        for file_id, owner in rows:
            try:
                await self.delete(owner, file_id)
                swept += 1
            except NotFoundError:  # deleted meanwhile, by its owner or another server's sweep
                pass
        return swept


def _record(row: sa.RowMapping) -> FileRecord:
    return FileRecord(row["id"], row["owner"], row["filename"], row["mime_type"], row["size_bytes"], row["sha256"],
                      utc(row["created_at"]), utc(row["expires_at"]))  # type: ignore[arg-type]
