"""Message Batches through the official SDK: the lifecycle, cancellation, and kill -9 durability."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anthropic
import pytest

from tests.e2e.conftest import API_KEY, Server


def params(i: int, max_tokens: int = 4) -> dict:
    return {"model": "tiny-vl", "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"Question {i}"}]}


def wait_until_ended(client: anthropic.Anthropic, batch_id: str, timeout: float = 300) -> anthropic.types.messages.MessageBatch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.messages.batches.retrieve(batch_id)
        if batch.processing_status == "ended":
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end: {batch}")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """Server arguments for a fresh store of each kind."""
    if request.param == "sqlite":
        yield ("--data-dir", str(tmp_path / "data"))
        return
    from tests.store.conftest import POSTGRES, drop_postgres_database, fresh_postgres_database

    if not POSTGRES:
        pytest.skip("no PostgreSQL server (set LOCALVL_TEST_POSTGRES_URL; .ci/run starts one)")
    url, name = fresh_postgres_database()
    # Servers on a shared database cannot take old claims back at start: they lapse (here, fast).
    yield ("--database-url", url, "--data-dir", str(tmp_path / "data"), "--batch-lease", "3")
    drop_postgres_database(name)


@pytest.fixture
def batch_client(request, backend, model_dir, tmp_path):
    server = Server(model_dir("qwen2_vl"), tmp_path / "server.log", *backend)
    yield anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)
    server.stop()


def test_the_whole_lifecycle(batch_client):
    client = batch_client
    requests = [{"custom_id": f"ok-{i}", "params": params(i)} for i in range(3)]
    requests += [{"custom_id": "no-max-tokens", "params": {"model": "tiny-vl", "messages": [{"role": "user", "content": "hi"}]}},
                 {"custom_id": "unknown-model", "params": {**params(9), "model": "gpt-nope"}}]
    batch = client.messages.batches.create(requests=requests)
    assert batch.id.startswith("msgbatch_") and batch.type == "message_batch"
    assert batch.processing_status == "in_progress" and batch.request_counts.processing == 5 and batch.results_url is None
    assert (batch.expires_at - batch.created_at).total_seconds() == pytest.approx(24 * 3600, abs=5)
    ended = wait_until_ended(client, batch.id)
    counts = ended.request_counts
    assert (counts.succeeded, counts.errored, counts.processing, counts.canceled, counts.expired) == (3, 2, 0, 0, 0)
    assert ended.ended_at is not None and ended.results_url.endswith(f"/v1/messages/batches/{batch.id}/results")
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert sorted(results) == sorted(r["custom_id"] for r in requests)
    for i in range(3):
        message = results[f"ok-{i}"].message
        assert results[f"ok-{i}"].type == "succeeded" and message.type == "message" and message.usage.output_tokens >= 1
    assert results["no-max-tokens"].type == "errored" and results["no-max-tokens"].error.error.type == "invalid_request_error"
    assert results["unknown-model"].error.error.type == "not_found_error"
    assert batch.id in [b.id for b in client.messages.batches.list(limit=10)]
    assert client.messages.batches.delete(batch.id).type == "message_batch_deleted"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.batches.retrieve(batch.id)


def test_bad_batches_are_refused_whole(client):
    with pytest.raises(anthropic.BadRequestError, match="used more than once"):
        client.messages.batches.create(requests=[{"custom_id": "a", "params": params(0)}, {"custom_id": "a", "params": params(1)}])
    with pytest.raises(anthropic.BadRequestError, match="custom_id"):
        client.messages.batches.create(requests=[{"custom_id": "has space", "params": params(0)}])


def test_cancel_stops_what_has_not_started(client):
    batch = client.messages.batches.create(requests=[{"custom_id": f"c{i}", "params": params(i, 64)} for i in range(300)])
    canceled = client.messages.batches.cancel(batch.id)
    assert canceled.cancel_initiated_at is not None and canceled.processing_status in ("canceling", "ended")
    ended = wait_until_ended(client, batch.id)
    counts = ended.request_counts
    assert counts.canceled > 0 and counts.succeeded + counts.canceled == 300 and counts.processing == 0
    kinds = {r.result.type for r in client.messages.batches.results(batch.id)}
    assert "canceled" in kinds and kinds <= {"canceled", "succeeded"}
    with pytest.raises(anthropic.BadRequestError):  # not ended yet: cannot be deleted
        fresh = client.messages.batches.create(requests=[{"custom_id": "x", "params": params(0, 64)}])
        client.messages.batches.delete(fresh.id)


def test_kill_9_in_the_middle_of_a_1000_request_batch_loses_and_repeats_nothing(model_dir, tmp_path, backend):
    extra = (*backend, "--batch-concurrency", "8")
    first = Server(model_dir("qwen2_vl"), tmp_path / "first.log", *extra)
    try:
        client = anthropic.Anthropic(base_url=first.url, api_key=API_KEY, max_retries=0)
        # r40-r199 answer at length, so the ones running when the server dies are still running
        batch = client.messages.batches.create(requests=[
            {"custom_id": f"r{i}", "params": params(i, 48 if 40 <= i < 200 else 4)} for i in range(1000)])
        deadline = time.monotonic() + 120
        while client.messages.batches.retrieve(batch.id).request_counts.succeeded < 50:
            assert time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.05)
        os.kill(first.process.pid, signal.SIGKILL)  # in the middle: some done, some in flight, most pending
        first.process.wait()
    finally:
        first.stop()
    second = Server(model_dir("qwen2_vl"), tmp_path / "second.log", *extra)
    try:
        client = anthropic.Anthropic(base_url=second.url, api_key=API_KEY, max_retries=0)
        ended = wait_until_ended(client, batch.id)
        assert ended.request_counts.succeeded == 1000
        lines = list(client.messages.batches.results(batch.id))
        ids = [line.custom_id for line in lines]
        assert len(ids) == 1000 and set(ids) == {f"r{i}" for i in range(1000)}  # none lost, none twice
        assert all(line.result.type == "succeeded" for line in lines)
    finally:
        second.stop()
    attempts = attempts_by_count(backend)
    # the requests in flight when the server died were done again, once; every other one once
    assert set(attempts) <= {1, 2} and 1 <= attempts.get(2, 0) <= 8 and sum(attempts.values()) == 1000


def test_requests_in_flight_when_the_engine_process_dies_are_done_again(model_dir, tmp_path, backend):
    first = Server(model_dir("qwen2_vl"), tmp_path / "first.log", *backend)
    try:
        client = anthropic.Anthropic(base_url=first.url, api_key=API_KEY, max_retries=0)
        # Lengths of their own: requests of one length finish in one step, and a kill just after
        # the first results could find nothing in flight (the next wave not yet claimed).
        batch = client.messages.batches.create(
            requests=[{"custom_id": f"e{i}", "params": params(i, 24 + 16 * (i % 8))} for i in range(40)])
        deadline = time.monotonic() + 120
        while client.messages.batches.retrieve(batch.id).request_counts.succeeded < 2:
            assert time.monotonic() < deadline, "the batch did not start"
            time.sleep(0.05)
        os.kill(first.engine_pid(), signal.SIGKILL)  # the server shuts itself down, to be restarted
        assert first.process.wait(timeout=60) == 1
    finally:
        first.stop()
    second = Server(model_dir("qwen2_vl"), tmp_path / "second.log", *backend)
    try:
        client = anthropic.Anthropic(base_url=second.url, api_key=API_KEY, max_retries=0)
        ended = wait_until_ended(client, batch.id)
        assert ended.request_counts.succeeded == 40 and ended.request_counts.errored == 0
        assert {line.result.type for line in client.messages.batches.results(batch.id)} == {"succeeded"}
    finally:
        second.stop()
    assert max(attempts_by_count(backend)) >= 2  # some were in flight at the kill, and were done again


def attempts_by_count(backend: tuple[str, ...]) -> dict[int, int]:
    query = "SELECT attempts, COUNT(*) FROM batch_requests GROUP BY attempts"
    if "--database-url" not in backend:
        import sqlite3

        with sqlite3.connect(Path(backend[backend.index("--data-dir") + 1]) / "localvl.db") as db:
            return dict(db.execute(query).fetchall())
    import asyncio

    import asyncpg

    async def read() -> dict[int, int]:
        url = backend[backend.index("--database-url") + 1].replace("postgresql+asyncpg://", "postgresql://")
        connection = await asyncpg.connect(url)
        try:
            return {row[0]: row[1] for row in await connection.fetch(query)}
        finally:
            await connection.close()

    return asyncio.run(read())


def test_two_servers_on_one_postgresql_share_a_batch_without_duplicates(model_dir, tmp_path):
    from tests.store.conftest import POSTGRES, drop_postgres_database, fresh_postgres_database

    if not POSTGRES:
        pytest.skip("no PostgreSQL server (set LOCALVL_TEST_POSTGRES_URL; .ci/run starts one)")
    url, name = fresh_postgres_database()
    servers = []
    try:
        for k in range(2):
            servers.append(Server(model_dir("qwen2_vl"), tmp_path / f"pg{k}.log", "--database-url", url,
                                  "--data-dir", str(tmp_path / f"data{k}"), "--batch-concurrency", "4"))
        a = anthropic.Anthropic(base_url=servers[0].url, api_key=API_KEY, max_retries=0)
        b = anthropic.Anthropic(base_url=servers[1].url, api_key=API_KEY, max_retries=0)
        batch = a.messages.batches.create(requests=[{"custom_id": f"p{i}", "params": params(i, 16)} for i in range(300)])
        ended = wait_until_ended(b, batch.id)  # the other server sees the same batch
        assert ended.request_counts.succeeded == 300
        ids = [line.custom_id for line in b.messages.batches.results(batch.id)]
        assert len(ids) == 300 and set(ids) == {f"p{i}" for i in range(300)}
        import asyncio

        import asyncpg

        async def workers() -> dict:
            connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                rows = await connection.fetch("SELECT claimed_by, COUNT(*) AS n FROM batch_requests GROUP BY claimed_by")
                return {row["claimed_by"]: row["n"] for row in rows}
            finally:
                await connection.close()

        by_worker = asyncio.run(workers())
        assert len(by_worker) == 2 and sum(by_worker.values()) == 300  # both servers took a share
    finally:
        for server in servers:
            server.stop()
        drop_postgres_database(name)


def test_a_debug_log_holds_no_client_content(client, server):
    # the server runs with --log-level debug: libraries' debug lines (aiosqlite quotes every SQL
    # parameter) must stay out, so stored requests and file names never reach the log
    marker = "zebra-marker-93731"
    client.messages.create(model="tiny-vl", max_tokens=2, messages=[{"role": "user", "content": f"{marker} in a message"}])
    client.beta.files.upload(file=(f"{marker}.txt", f"{marker} in a file".encode(), "text/plain"))
    batch = client.messages.batches.create(requests=[{"custom_id": "m", "params": {
        "model": "tiny-vl", "max_tokens": 2, "messages": [{"role": "user", "content": f"{marker} in a batch"}]}}])
    wait_until_ended(client, batch.id)
    assert marker not in server.log()


def test_results_url_keeps_the_scheme_a_believed_proxy_reports(model_dir, tmp_path):
    """Behind a proxy that ends TLS, results_url must say https, or the SDK would send its key over
    plain HTTP to fetch the results. Proxies are believed by --forwarded-allow-ips (loopback by default)."""
    server = Server(model_dir("qwen2_vl"), tmp_path / "server.log", "--forwarded-allow-ips", "10.0.0.0/8,192.168.7.7")
    try:
        client = anthropic.Anthropic(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=60)
        batch = wait_until_ended(client, client.messages.batches.create(requests=[{"custom_id": "a", "params": params(0)}]).id)
        assert batch.results_url.startswith("http://")
        # this client (127.0.0.1) is no proxy named: what it claims about the scheme is not taken
        claimed = client.messages.batches.retrieve(batch.id, extra_headers={"x-forwarded-proto": "https"})
        assert claimed.results_url.startswith("http://127.0.0.1")
    finally:
        server.stop()
    trusting = Server(model_dir("qwen2_vl"), tmp_path / "trusting.log", "--data-dir", str(server.log_path.parent / f"data-{server.port}"))
    try:
        client = anthropic.Anthropic(base_url=trusting.url, api_key=API_KEY, max_retries=0, timeout=60)
        behind_tls = client.messages.batches.retrieve(batch.id, extra_headers={"x-forwarded-proto": "https"})
        assert behind_tls.results_url == f"https://127.0.0.1:{trusting.port}/v1/messages/batches/{batch.id}/results"
    finally:
        trusting.stop()
