"""The store, opened on first use: a server that never sees a file or a batch never touches disk."""

from __future__ import annotations

import asyncio
import logging

from localvl.settings import Settings
from localvl.store.batches import BatchStore
from localvl.store.database import Database, default_url
from localvl.store.files import FileStore
from localvl.store.keys import KeyStore

logger = logging.getLogger(__name__)


class LazyStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._database: Database | None = None
        self._files: FileStore | None = None
        self._batches: BatchStore | None = None
        self._keys: KeyStore | None = None
        self._lock = asyncio.Lock()

    @property
    def opened(self) -> bool:
        """Whether there is a store to work with: one opened already, one configured by URL, or a
        SQLite file an earlier run left behind (a restarted server resumes its batches)."""
        if self._database is not None or self.settings.database_url:
            return True
        return (self.settings.resolved_data_dir() / "localvl.db").is_file()

    async def database(self) -> Database:
        async with self._lock:
            if self._database is None:
                data_dir = self.settings.resolved_data_dir()
                database = Database(self.settings.database_url or default_url(data_dir))
                await database.start()
                self._database = database
            return self._database

    async def files(self) -> FileStore:
        database = await self.database()
        if self._files is None:
            files = FileStore(database, self.settings.resolved_data_dir() / "files")
            try:
                await files.sweep_orphans()
            except Exception as error:  # housekeeping: never in the way of the files themselves
                logger.warning("orphaned uploads not swept (%s)", type(error).__name__)
            self._files = files
        return self._files

    async def batches(self) -> BatchStore:
        database = await self.database()
        if self._batches is None:
            self._batches = BatchStore(database, lease_s=self.settings.batch_lease)
        return self._batches

    async def keys(self) -> KeyStore:
        database = await self.database()
        if self._keys is None:
            self._keys = KeyStore(database)
        return self._keys

    async def stop(self) -> None:
        if self._database is not None:
            await self._database.stop()
            self._database = None
            self._files = None
            self._batches = None
            self._keys = None
