"""Uploaded files on each backend: ownership, paging, ids, expiry, deletion."""

import asyncio
import io

import pytest

from localvl.errors import NotFoundError
import sqlalchemy as sa

from localvl.store.database import Database, file_chunks
from localvl.store.files import FileStore


def test_files_on_every_backend(database_url, tmp_path):
    async def body():
        database = Database(database_url)
        await database.start()
        store = FileStore(database, tmp_path / "files")
        try:
            made = [await store.create("alice", f"f{i}.txt", "text/plain", io.BytesIO(b"x" * (i + 1))) for i in range(5)]
            other = await store.create("bob", "b.txt", "text/plain", io.BytesIO(b"bob"))
            first, more = await store.page("alice", 2, None, None)
            assert [r.id for r in first] == [made[4].id, made[3].id] and more
            older, _ = await store.page("alice", 10, None, first[-1].id)
            assert [r.id for r in older] == [made[2].id, made[1].id, made[0].id]
            newer, _ = await store.page("alice", 10, made[1].id, None)
            assert [r.id for r in newer] == [made[4].id, made[3].id, made[2].id]
            chosen, _ = await store.page("alice", 100, None, None, ids=[made[0].id, other.id])
            assert [r.id for r in chosen] == [made[0].id]  # bob's file is not alice's to list
            record, data = await store.read("alice", made[2].id)
            assert data == b"xxx" and record.size_bytes == 3
            with pytest.raises(NotFoundError):
                await store.get("bob", made[0].id)
            brief = await store.create("alice", "brief.txt", "text/plain", io.BytesIO(b"soon gone"), expires_in=0.01)
            await asyncio.sleep(0.05)
            with pytest.raises(NotFoundError, match="expired"):
                await store.get("alice", brief.id)
            assert not store.path(brief.id).exists()
            await store.delete("alice", made[0].id)
            with pytest.raises(NotFoundError):
                await store.delete("alice", made[0].id)
        finally:
            await database.stop()

    asyncio.run(body())


def test_a_killed_uploads_half_file_is_swept_and_a_failed_record_leaves_no_bytes(tmp_path, monkeypatch):
    from localvl.store import files as files_module

    import os
    import time

    directory = tmp_path / "files"
    directory.mkdir()
    stale, fresh = directory / "file_011stale.part", directory / "file_011fresh.part"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written by another server")
    an_hour_ago = time.time() - 7200
    os.utime(stale, (an_hour_ago, an_hour_ago))

    async def body():
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'localvl.db'}")
        await database.start()
        try:
            store = FileStore(database, directory)
            assert not stale.exists() and fresh.exists()
            class Gone:
                def insert(self):
                    raise RuntimeError("the database went away")

            monkeypatch.setattr(files_module, "files", Gone())  # the record cannot be written now
            with pytest.raises(RuntimeError, match="went away"):
                await store.create("alice", "x.txt", "text/plain", io.BytesIO(b"orphan?"))
            assert sorted(p.name for p in directory.iterdir()) == [fresh.name]
        finally:
            await database.stop()

    asyncio.run(body())


def test_a_file_stored_by_one_server_is_read_by_another_sharing_its_database(database_url, tmp_path):
    # two servers: one database, a data directory each (SQLite is one server's: its bytes stay on disk)
    async def body():
        one, two = Database(database_url), Database(database_url)
        await one.start()
        await two.start()
        try:
            mine, theirs = FileStore(one, tmp_path / "one"), FileStore(two, tmp_path / "two")
            content = bytes(range(256)) * 9000  # past one piece
            record = await mine.create("alice", "big.bin", "application/octet-stream", io.BytesIO(content))
            if not mine.in_database:
                with pytest.raises(NotFoundError):  # a clear 404, not a failure, when the bytes are elsewhere
                    await theirs.read("alice", record.id)
                return
            assert (await theirs.read("alice", record.id))[1] == content
            await theirs.delete("alice", record.id)
            with pytest.raises(NotFoundError):
                await mine.read("alice", record.id)
            async with one.engine.connect() as connection:  # no bytes left behind
                assert (await connection.execute(sa.select(sa.func.count()).select_from(file_chunks))).scalar() == 0
        finally:
            await one.stop()
            await two.stop()

    asyncio.run(body())


def test_whole_files_no_row_points_at_are_swept_once_stale(tmp_path):
    import os
    import time

    async def body():
        database = Database(f"sqlite+aiosqlite:///{tmp_path / 'localvl.db'}")
        await database.start()
        try:
            store = FileStore(database, tmp_path / "files")
            kept = await store.create("alice", "kept.txt", "text/plain", io.BytesIO(b"kept"))
            # a server killed between writing the bytes and recording them: an old orphan, and a
            # fresh one (another server may be about to record it)
            orphan, fresh = store.path("file_011orphan"), store.path("file_011fresh")
            orphan.write_bytes(b"never recorded")
            fresh.write_bytes(b"being recorded")
            an_hour_ago = time.time() - 7200
            for path in (orphan, store.path(kept.id)):
                os.utime(path, (an_hour_ago, an_hour_ago))
            assert await store.sweep_orphans() == 1
            assert not orphan.exists() and fresh.exists()
            assert (await store.read("alice", kept.id))[1] == b"kept"
        finally:
            await database.stop()

    asyncio.run(body())


def test_expired_files_are_swept_without_being_asked_for(database_url, tmp_path):
    async def body():
        database = Database(database_url)
        await database.start()
        store = FileStore(database, tmp_path / "files")
        try:
            kept = await store.create("alice", "kept.txt", "text/plain", io.BytesIO(b"stays"))
            lasting = await store.create("bob", "later.txt", "text/plain", io.BytesIO(b"a day"), expires_in=86400)
            brief = [await store.create(owner, "brief.txt", "text/plain", io.BytesIO(b"soon gone" * 100), expires_in=0.01)
                     for owner in ("alice", "bob")]
            await asyncio.sleep(0.05)
            assert await store.sweep_expired() == 2
            assert await store.sweep_expired() == 0
            async with database.connect() as connection:
                ids = set((await connection.execute(sa.text("SELECT id FROM files"))).scalars())
                pieces = set((await connection.execute(sa.select(file_chunks.c.file_id))).scalars())
            assert ids == {kept.id, lasting.id}
            for record in brief:  # no bytes left behind, wherever this backend keeps them
                assert record.id not in pieces and not store.path(record.id).exists()
            assert (await store.read("alice", kept.id))[1] == b"stays"
        finally:
            await database.stop()

    asyncio.run(body())
