"""The claim protocol of batch requests: each answered once, claims lapse, batches end and expire."""

import asyncio
import datetime as dt
import json

import pytest

from localvl.store.batches import BatchStore
from localvl.store.database import Database


def run(url, body, lease_s=60.0):
    async def main():
        database = Database(url)
        await database.start()
        try:
            return await body(BatchStore(database, lease_s=lease_s))
        finally:
            await database.stop()

    return asyncio.run(main())


REQUESTS = [(f"r{i}", {"i": i}) for i in range(10)]


def test_two_workers_never_claim_the_same_request(database_url):
    async def body(store):
        batch = await store.create("", REQUESTS, dt.timedelta(hours=1))
        a, b = await asyncio.gather(store.claim("a", 6), store.claim("b", 6))
        keys_a, keys_b = {c.position for c in a}, {c.position for c in b}
        assert not keys_a & keys_b and len(keys_a | keys_b) == 10
        first = (a + b)[0]
        holder, other = ("a", "b") if first in a else ("b", "a")
        assert not await store.finish(other, first.batch_id, first.position, "succeeded", {"type": "succeeded"})
        assert await store.finish(holder, first.batch_id, first.position, "succeeded", {"type": "succeeded"})
        assert not await store.finish(holder, first.batch_id, first.position, "succeeded", {"type": "succeeded"})
        return await store.get("", batch.id)

    batch = run(database_url, body)
    assert batch.counts["succeeded"] == 1 and batch.counts["processing"] == 9 and batch.ended_at is None


def test_a_lapsed_claim_is_done_again_and_its_first_holder_cannot_answer(database_url):
    async def body(store):
        await store.create("", REQUESTS[:1], dt.timedelta(hours=1))
        [dead] = await store.claim("dead", 1)
        await asyncio.sleep(0.05)
        await store.sweep(dt.timedelta(days=29))  # lease 0.01 s: lapsed
        [again] = await store.claim("alive", 1)
        assert (again.batch_id, again.position) == (dead.batch_id, dead.position)
        assert not await store.finish("dead", dead.batch_id, dead.position, "succeeded", {})
        assert await store.finish("alive", again.batch_id, again.position, "succeeded", {"type": "succeeded"})
        return await store.get("", again.batch_id)

    batch = run(database_url, body, lease_s=0.01)
    assert batch.ended_at is not None and batch.counts["succeeded"] == 1


def test_expiry_and_retention(database_url):
    async def body(store):
        expired = await store.create("", REQUESTS[:3], dt.timedelta(seconds=-1))  # already past its 24 h
        await store.sweep(dt.timedelta(days=29))
        expired = await store.get("", expired.id)
        assert expired.counts["expired"] == 3 and expired.ended_at is not None
        assert [line async for line in store.results("", expired.id)]
        await store.sweep(dt.timedelta(seconds=-1))  # results kept for "no time at all": archived now
        archived = await store.get("", expired.id)
        assert archived.archived_at is not None
        with pytest.raises(Exception, match="deleted"):
            [line async for line in store.results("", expired.id)]

    run(database_url, body)


def test_many_workers_at_once_answer_each_request_exactly_once(database_url):
    async def body(store):
        batch = await store.create("", [(f"r{i}", {}) for i in range(200)], dt.timedelta(hours=1))

        async def worker(name):
            done = 0
            while claimed := await store.claim(name, 7):
                for item in claimed:
                    done += await store.finish(name, item.batch_id, item.position, "succeeded", {"type": "succeeded"})
            return done

        counts = await asyncio.gather(*(worker(f"w{k}") for k in range(5)))
        final = await store.get("", batch.id)
        lines = b"".join([chunk async for chunk in store.results("", batch.id)]).splitlines()
        return counts, final, lines

    counts, final, lines = run(database_url, body)
    assert sum(counts) == 200 and final.counts["succeeded"] == 200 and final.ended_at is not None
    assert len(lines) == 200 and len(set(lines)) == 200


def test_a_canceled_batch_whose_running_claims_lapse_or_are_given_back_ends(database_url):
    async def body(store):
        batch = await store.create("", REQUESTS[:4], dt.timedelta(hours=1))
        lapsed, released, finished = await store.claim("dead", 1) + await store.claim("stopping", 1) + await store.claim("alive", 1)
        await store.cancel("", batch.id)  # the fourth, pending, is canceled now; three run on
        await store.release("stopping", released.batch_id, released.position)
        assert await store.finish("alive", finished.batch_id, finished.position, "succeeded", {"type": "succeeded"})
        await asyncio.sleep(0.05)
        await store.sweep(dt.timedelta(days=29))  # "dead"'s claim has lapsed
        lines = b"".join([chunk async for chunk in store.results("", batch.id)]).splitlines()
        return await store.get("", batch.id), lines

    batch, lines = run(database_url, body, lease_s=0.01)
    assert batch.ended_at is not None and batch.processing_status == "ended"
    assert batch.counts == {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 3, "expired": 0}
    assert len(lines) == 4


def test_a_page_is_newest_first_whichever_cursors_are_given(database_url):
    async def body(store):
        made = [(await store.create("", REQUESTS[:1], dt.timedelta(hours=1))).id for _ in range(5)]
        newest = made[::-1]
        older, more = await store.page("", 2, None, newest[1])
        newer, _ = await store.page("", 2, newest[4], None)
        both, _ = await store.page("", 10, newest[3], newest[0])  # after_id pages, as /v1/models does
        return newest, [b.id for b in older], more, [b.id for b in newer], [b.id for b in both]

    newest, older, more, newer, both = run(database_url, body)
    assert older == newest[2:4] and more
    assert newer == newest[2:4]
    assert both == newest[1:]


def test_a_batch_whose_server_died_between_its_last_result_and_its_end_is_ended_by_the_sweep(database_url):
    from localvl.store.database import batches

    async def body(store):
        batch = await store.create("", REQUESTS[:2], dt.timedelta(hours=1))
        for item in await store.claim("w", 2):
            assert await store.finish("w", item.batch_id, item.position, "succeeded", {"type": "succeeded"})
        async with store.database.engine.begin() as connection:  # as if killed before the batch was ended
            await connection.execute(batches.update().values(ended_at=None))
        assert (await store.get("", batch.id)).processing_status == "in_progress"
        await store.sweep(dt.timedelta(days=29))
        return await store.get("", batch.id)

    batch = run(database_url, body)
    assert batch.processing_status == "ended" and batch.counts["succeeded"] == 2


def test_a_request_whose_server_dies_under_it_every_time_is_errored_not_claimed_forever(database_url):
    from localvl.store.batches import MAX_ATTEMPTS

    async def body(store):
        batch = await store.create("", REQUESTS[:2], dt.timedelta(hours=1))
        for _ in range(MAX_ATTEMPTS):  # each claim's server dies before it answers
            [poison, *_] = await store.claim("w", 1)
            assert poison.position == 0
            await asyncio.sleep(0.02)
            await store.sweep(dt.timedelta(days=29))
        [healthy] = await store.claim("w", 1)
        assert await store.finish("w", healthy.batch_id, healthy.position, "succeeded", {"type": "succeeded"})
        lines = [json.loads(line) for line in b"".join([c async for c in store.results("", batch.id)]).splitlines()]
        return await store.get("", batch.id), lines

    batch, lines = run(database_url, body, lease_s=0.01)
    assert batch.processing_status == "ended" and batch.counts["errored"] == 1 and batch.counts["succeeded"] == 1
    assert lines[0]["result"]["type"] == "errored" and lines[0]["result"]["error"]["error"]["type"] == "api_error"


def test_a_request_given_back_because_the_server_was_busy_or_stopping_never_runs_out_of_attempts(database_url):
    from localvl.store.batches import MAX_ATTEMPTS

    async def body(store):
        batch = await store.create("", REQUESTS[:1], dt.timedelta(hours=1))
        for _ in range(MAX_ATTEMPTS + 2):  # the engine's queue full, or the server draining, each time
            [item] = await store.claim("w", 1)
            await store.release("w", item.batch_id, item.position)
        [item] = await store.claim("w", 1)
        assert await store.finish("w", item.batch_id, item.position, "succeeded", {"type": "succeeded"})
        return await store.get("", batch.id)

    batch = run(database_url, body)
    assert batch.counts["succeeded"] == 1


def test_results_stay_one_line_each_for_readers_that_split_on_unicode_line_breaks(database_url):
    # JSON may carry U+2028, U+2029 and NEL raw in a string; str.splitlines() breaks lines at them.
    text = "a\u2028b\u2029c\x85d"

    async def body(store):
        batch = await store.create("", REQUESTS[:2], dt.timedelta(hours=1))
        for item in await store.claim("w", 2):
            await store.finish("w", item.batch_id, item.position, "succeeded", {"type": "succeeded", "text": text})
        return b"".join([chunk async for chunk in store.results("", batch.id)]).decode()

    lines = run(database_url, body).splitlines()
    assert [json.loads(line)["result"]["text"] for line in lines] == [text, text]
