"""Message Batches in the SQL store: the batch rows, one row per request, and the claim protocol.

Every request row moves ``pending → running → succeeded | errored`` (or ``pending → canceled |
expired``). A worker *claims* pending rows — marks them ``running`` under its own id and the time —
in one statement, with ``FOR UPDATE SKIP LOCKED`` where the database has it, so two servers on one
PostgreSQL never take the same row. A result is written only by the claim that holds the row, in
the same statement that ends it, so a request is answered at most once. A claim not renewed
within its lease (the server was killed) returns the row to ``pending``: a request in flight when
its server died is done again, once.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import string
from dataclasses import dataclass
from typing import Any, AsyncIterator

import sqlalchemy as sa

from localvl.errors import InvalidRequestError, NotFoundError
from localvl.json_lines import one_line
from localvl.store.database import Database, batch_requests, batches, newest_first, utc

_ALPHABET = string.ascii_letters + string.digits
TERMINAL = ("succeeded", "errored", "canceled", "expired")
# Claims of one request that ended without a result (its server or engine died under it) before
# it is answered as errored: a request that kills the engine every time would otherwise make
# every server that takes it crash, for good.
MAX_ATTEMPTS = 5
_GAVE_UP = {"type": "errored", "error": {"type": "error", "error": {
    "type": "api_error",
    "message": f"the server failed {MAX_ATTEMPTS} times while answering this request; it was not tried again",
}}}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Batch:
    id: str
    owner: str
    created_at: dt.datetime
    expires_at: dt.datetime
    cancel_initiated_at: dt.datetime | None
    ended_at: dt.datetime | None
    archived_at: dt.datetime | None
    counts: dict[str, int]  # processing, succeeded, errored, canceled, expired

    @property
    def processing_status(self) -> str:
        if self.ended_at is not None:
            return "ended"
        return "canceling" if self.cancel_initiated_at is not None else "in_progress"


@dataclass(frozen=True)
class Claimed:
    batch_id: str
    position: int
    custom_id: str
    params: dict[str, Any]


class BatchStore:
    def __init__(self, database: Database, lease_s: float = 120.0) -> None:
        self.database = database
        self.lease_s = lease_s
        self._skip_locked = database.engine.dialect.name == "postgresql"

    async def create(self, owner: str, requests: list[tuple[str, dict[str, Any]]], ttl: dt.timedelta) -> Batch:
        batch_id = "msgbatch_01" + "".join(secrets.choice(_ALPHABET) for _ in range(22))
        now = _now()
        async with self.database.begin() as connection:
            await connection.execute(batches.insert().values(
                id=batch_id, owner=owner, created_at=now, expires_at=now + ttl, total=len(requests)
            ))
            rows = [
                {"batch_id": batch_id, "position": i, "custom_id": custom_id, "params": json.dumps(params),
                 "status": "pending", "attempts": 0}
                for i, (custom_id, params) in enumerate(requests)
            ]
            for start in range(0, len(rows), 1000):
                await connection.execute(batch_requests.insert(), rows[start : start + 1000])
        return await self.get(owner, batch_id)

    async def get(self, owner: str, batch_id: str) -> Batch:
        async with self.database.connect() as connection:
            row = (await connection.execute(
                sa.select(batches).where(batches.c.id == batch_id, batches.c.owner == owner)
            )).mappings().first()
            if row is None:
                raise NotFoundError(f"batch not found: {batch_id}")
            counts = await self._counts(connection, batch_id)
        return _batch(row, counts)

    async def _counts(self, connection: Any, batch_id: str) -> dict[str, int]:
        rows = (await connection.execute(
            sa.select(batch_requests.c.status, sa.func.count()).where(batch_requests.c.batch_id == batch_id)
            .group_by(batch_requests.c.status)
        )).all()
        by_status = {status: count for status, count in rows}
        return {
            "processing": by_status.get("pending", 0) + by_status.get("running", 0),
            **{status: by_status.get(status, 0) for status in TERMINAL},
        }

    async def page(self, owner: str, limit: int, before_id: str | None, after_id: str | None) -> tuple[list[Batch], bool]:
        """Newest first, paged as Anthropic pages it (``after_id``: older, ``before_id``: newer)."""
        anchor = await self.get(owner, after_id or before_id or "") if (after_id or before_id) else None
        query = newest_first(sa.select(batches).where(batches.c.owner == owner), batches,
                             anchor and (anchor.created_at, anchor.id), bool(after_id), limit)
        async with self.database.connect() as connection:
            rows = (await connection.execute(query)).mappings().all()
            found = [_batch(row, await self._counts(connection, row["id"])) for row in rows[:limit]]
        if before_id and not after_id:  # both given: after_id pages, as /v1/models does
            found.reverse()
        return found, len(rows) > limit

    async def cancel(self, owner: str, batch_id: str) -> Batch:
        """Requests not yet started are canceled; those running finish."""
        batch = await self.get(owner, batch_id)
        if batch.ended_at is None:
            async with self.database.begin() as connection:
                await connection.execute(batches.update().where(
                    batches.c.id == batch_id, batches.c.cancel_initiated_at.is_(None)
                ).values(cancel_initiated_at=_now()))
                await connection.execute(batch_requests.update().where(
                    batch_requests.c.batch_id == batch_id, batch_requests.c.status == "pending"
                ).values(status="canceled", result=json.dumps({"type": "canceled"})))
            await self.settle(batch_id)
        return await self.get(owner, batch_id)

    async def delete(self, owner: str, batch_id: str) -> None:
        batch = await self.get(owner, batch_id)
        if batch.ended_at is None:
            raise InvalidRequestError(
                f"batch {batch_id} is still being processed; cancel it and wait for it to end before deleting it"
            )
        async with self.database.begin() as connection:
            await connection.execute(batch_requests.delete().where(batch_requests.c.batch_id == batch_id))
            await connection.execute(batches.delete().where(batches.c.id == batch_id))

    async def results(self, owner: str, batch_id: str, chunk: int = 500) -> AsyncIterator[bytes]:
        """The results as JSONL, read from the store a chunk of rows at a time."""
        batch = await self.get(owner, batch_id)
        if batch.ended_at is None:
            raise InvalidRequestError(f"batch {batch_id} has not ended yet; its results are not ready")
        if batch.archived_at is not None:
            raise NotFoundError(f"the results of batch {batch_id} were deleted")
        position = -1
        while True:
            async with self.database.connect() as connection:
                rows = (await connection.execute(
                    sa.select(batch_requests.c.position, batch_requests.c.custom_id, batch_requests.c.result)
                    .where(batch_requests.c.batch_id == batch_id, batch_requests.c.position > position)
                    .order_by(batch_requests.c.position).limit(chunk)
                )).all()
            if not rows:
                return
            lines = [b'{"custom_id":' + json.dumps(custom_id).encode() + b',"result":' + one_line(result or "null").encode() + b"}\n"
                     for _, custom_id, result in rows]
            yield b"".join(lines)
            position = rows[-1][0]

    # ------------------------------------------------------------------ the worker's side

    async def owner_of(self, batch_id: str) -> str:
        async with self.database.connect() as connection:
            owner = (await connection.execute(sa.select(batches.c.owner).where(batches.c.id == batch_id))).scalar()
        if owner is None:
            raise NotFoundError(f"batch not found: {batch_id}")
        return owner

    async def reclaim_all(self) -> int:
        """Every running request back to pending: for a database only this server uses (SQLite),
        whose claims were all made by this server's earlier run."""
        async with self.database.begin() as connection:
            done = await connection.execute(batch_requests.update().where(batch_requests.c.status == "running")
                                            .values(status="pending", claimed_by=None, claimed_at=None))
        return done.rowcount

    async def claim(self, worker: str, count: int) -> list[Claimed]:
        """Up to ``count`` pending requests, oldest batch first, now running under ``worker``.

        Rows another worker took between the look and the take are skipped, and looked for again.
        """
        claimed: list[Claimed] = []
        for _ in range(8):
            got, lost = await self._claim_once(worker, count - len(claimed))
            claimed += got
            if not lost or len(claimed) >= count:
                break
        return claimed

    async def _claim_once(self, worker: str, count: int) -> tuple[list[Claimed], bool]:
        now = _now()
        async with self.database.begin() as connection:
            pending = (
                sa.select(batch_requests.c.batch_id, batch_requests.c.position, batch_requests.c.attempts)
                .join(batches, batches.c.id == batch_requests.c.batch_id)
                .where(batch_requests.c.status == "pending", batches.c.cancel_initiated_at.is_(None),
                       batches.c.expires_at > now)
                .order_by(batches.c.created_at, batch_requests.c.position)
                .limit(count)
            )
            if self._skip_locked:
                pending = pending.with_for_update(skip_locked=True, of=batch_requests)
            keys = (await connection.execute(pending)).all()
            claimed: list[Claimed] = []
            gave_up: set[str] = set()
            for batch_id, position, attempts in keys:
                if attempts >= MAX_ATTEMPTS:
                    await connection.execute(batch_requests.update().where(
                        batch_requests.c.batch_id == batch_id, batch_requests.c.position == position,
                        batch_requests.c.status == "pending",
                    ).values(status="errored", result=json.dumps(_GAVE_UP)))
                    gave_up.add(batch_id)
                    continue
                updated = await connection.execute(
                    batch_requests.update()
                    .where(batch_requests.c.batch_id == batch_id, batch_requests.c.position == position,
                           batch_requests.c.status == "pending")
                    .values(status="running", claimed_by=worker, claimed_at=now, attempts=batch_requests.c.attempts + 1)
                    .returning(batch_requests.c.custom_id, batch_requests.c.params)
                )
                row = updated.first()
                if row is not None:
                    claimed.append(Claimed(batch_id, position, row[0], json.loads(row[1])))
        for batch_id in gave_up:
            await self.settle(batch_id)
        # (rows given up on count as lost: claiming looks again, for others in their place)
        return claimed, len(claimed) < len(keys)

    async def renew(self, worker: str, keys: list[tuple[str, int]]) -> None:
        """Keep the claims of requests still being worked on (their lease starts again)."""
        if not keys:
            return
        async with self.database.begin() as connection:
            for batch_id, position in keys:
                await connection.execute(batch_requests.update().where(
                    batch_requests.c.batch_id == batch_id, batch_requests.c.position == position,
                    batch_requests.c.claimed_by == worker, batch_requests.c.status == "running",
                ).values(claimed_at=_now()))

    async def finish(self, worker: str, batch_id: str, position: int, status: str, result: dict[str, Any]) -> bool:
        """Write a result, if this worker still holds the request; whether it did."""
        async with self.database.begin() as connection:
            done = await connection.execute(batch_requests.update().where(
                batch_requests.c.batch_id == batch_id, batch_requests.c.position == position,
                batch_requests.c.claimed_by == worker, batch_requests.c.status == "running",
            ).values(status=status, result=json.dumps(result, ensure_ascii=False)))
        await self.settle(batch_id)
        return done.rowcount == 1

    async def release(self, worker: str, batch_id: str, position: int, attempted: bool = False) -> None:
        """Give a claimed request back (the worker is stopping, the engine is full or died):
        another claim will do it, or, in a batch canceled meanwhile, the sweep cancels it (no
        claim takes it any more). Only an ``attempted`` one (its engine died under it) counts
        towards ``MAX_ATTEMPTS``: a busy or stopping server never makes a request fail."""
        async with self.database.begin() as connection:
            await connection.execute(batch_requests.update().where(
                batch_requests.c.batch_id == batch_id, batch_requests.c.position == position,
                batch_requests.c.claimed_by == worker, batch_requests.c.status == "running",
            ).values(status="pending", claimed_by=None, claimed_at=None,
                     attempts=batch_requests.c.attempts - (0 if attempted else 1)))

    async def settle(self, batch_id: str) -> None:
        """End the batch once no request of it is pending or running."""
        async with self.database.begin() as connection:
            open_requests = (await connection.execute(
                sa.select(sa.func.count()).where(batch_requests.c.batch_id == batch_id,
                                                 batch_requests.c.status.in_(("pending", "running")))
            )).scalar()
            if open_requests == 0:
                await connection.execute(batches.update().where(
                    batches.c.id == batch_id, batches.c.ended_at.is_(None)
                ).values(ended_at=_now()))

    async def sweep(self, retention: dt.timedelta) -> None:
        """Claims past their lease go back to pending; expired batches' pending requests expire;
        results older than ``retention`` after their batch ended are deleted (the batch is archived)."""
        now = _now()
        async with self.database.begin() as connection:
            await connection.execute(batch_requests.update().where(
                batch_requests.c.status == "running",
                batch_requests.c.claimed_at < now - dt.timedelta(seconds=self.lease_s),
            ).values(status="pending", claimed_by=None, claimed_at=None))
            expired = (await connection.execute(
                sa.select(batches.c.id).where(batches.c.expires_at <= now, batches.c.ended_at.is_(None))
            )).scalars().all()
            if expired:
                await connection.execute(batch_requests.update().where(
                    batch_requests.c.batch_id.in_(expired), batch_requests.c.status == "pending"
                ).values(status="expired", result=json.dumps({"type": "expired"})))
            # A request running when its batch was canceled, whose claim then lapsed or was given
            # back (its server killed or stopping), is pending again, and claims skip canceled
            # batches: canceled here, or the batch would stay "canceling" for good.
            canceling = (await connection.execute(sa.select(batches.c.id).where(
                batches.c.cancel_initiated_at.is_not(None), batches.c.ended_at.is_(None)
            ))).scalars().all()
            if canceling:
                await connection.execute(batch_requests.update().where(
                    batch_requests.c.batch_id.in_(canceling), batch_requests.c.status == "pending"
                ).values(status="canceled", result=json.dumps({"type": "canceled"})))
            old = (await connection.execute(sa.select(batches.c.id).where(
                batches.c.ended_at.is_not(None), batches.c.ended_at <= now - retention, batches.c.archived_at.is_(None)
            ))).scalars().all()
            if old:
                await connection.execute(batch_requests.update().where(
                    batch_requests.c.batch_id.in_(old)).values(result=None, params="{}"))
                await connection.execute(batches.update().where(batches.c.id.in_(old)).values(archived_at=now))
            # A server killed between writing a batch's last result and ending the batch (two
            # statements) leaves it with nothing open that would ever settle it: ended here.
            open_requests = sa.select(batch_requests.c.batch_id).where(
                batch_requests.c.batch_id == batches.c.id, batch_requests.c.status.in_(("pending", "running")))
            await connection.execute(batches.update().where(
                batches.c.ended_at.is_(None), ~sa.exists(open_requests)
            ).values(ended_at=now))
        for batch_id in {*expired, *canceling}:
            await self.settle(batch_id)


def _batch(row: Any, counts: dict[str, int]) -> Batch:
    return Batch(row["id"], row["owner"], utc(row["created_at"]), utc(row["expires_at"]),  # type: ignore[arg-type]
                 utc(row["cancel_initiated_at"]), utc(row["ended_at"]), utc(row["archived_at"]), counts)
