"""Keys, JWTs, rate limits, running-request limits and the response cache, through the official
SDKs against a real server."""

import os
import threading
import time

import anthropic
import httpx
import jwt
import openai
import pytest

from localvl.cli import main
from tests.e2e.conftest import API_KEY, Server, free_port

SECRET = "jwt-secret-" + "x" * 32


@pytest.fixture(scope="module")
def keyed(model_dir, tmp_path_factory):
    """A server whose keys live in its store (plus JWTs), with a response cache."""
    data = tmp_path_factory.mktemp("keyed-data")
    made = {}
    keys = (("limited", ["--rpm", "2"]), ("free", []), ("single", ["--max-streams", "1"]), ("openai", ["--rpm", "5", "--otpm", "1000"]),
            ("leaving", ["--itpm", "60", "--otpm", "60"]))
    for name, limits in keys:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            assert main(["keys", "create", "--name", name, *limits, "--data-dir", str(data)]) == 0
        made[name] = out.getvalue().strip()
    server = Server(model_dir("qwen2_5_vl"), tmp_path_factory.mktemp("logs") / "keyed.log", "--data-dir", str(data),
                    "--jwt-secret", SECRET, "--response-cache", "32")
    yield server, made, data
    server.stop()


def client(server, key=None, **kwargs):
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, **kwargs)


def ask(c, **kwargs):
    values = dict(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    values.update(kwargs)
    return c.messages.create(**values)


def test_stored_keys_authenticate_and_bad_ones_do_not(keyed):
    server, made, _ = keyed
    assert ask(client(server, made["free"])).usage.output_tokens > 0
    assert ask(client(server, API_KEY)).usage.output_tokens > 0  # flags and the store side by side
    with pytest.raises(anthropic.AuthenticationError):
        ask(client(server, made["free"] + "x"))


def test_a_revoked_key_stops_working_within_seconds(keyed, capsys):
    server, _, data = keyed
    assert main(["keys", "create", "--name", "temp", "--data-dir", str(data)]) == 0
    key = capsys.readouterr().out.strip()
    time.sleep(5.5)  # a key made after the server looked is found at its next look
    assert ask(client(server, key)).usage.output_tokens > 0
    assert main(["keys", "revoke", "temp", "--data-dir", str(data)]) == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            ask(client(server, key))
        except anthropic.AuthenticationError:
            return
        time.sleep(0.5)
    raise AssertionError("a revoked key still works")


def test_rate_limits_reach_the_sdk_with_retry_after(keyed):
    server, made, _ = keyed
    c = client(server, made["limited"])
    raw = c.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "a"}])
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "2"
    ask(c)
    with pytest.raises(anthropic.RateLimitError) as raised:
        ask(c)
    assert raised.value.response.headers["retry-after"].isdigit()
    assert raised.value.body["error"]["type"] == "rate_limit_error"
    ask(client(server, made["free"]))  # one key's limit is not another's


def test_the_openai_sdk_sees_openais_rate_limit_headers(keyed):
    server, made, _ = keyed
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=made["openai"], max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.parse().usage.completion_tokens > 0
    assert raw.headers["x-ratelimit-limit-requests"] == "5" and raw.headers["x-ratelimit-remaining-requests"] == "4"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")  # e.g. "12s": a request refills in 12
    # tokens are charged when an answer ends: at the first answer the bucket is still full
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000" and raw.headers["x-ratelimit-remaining-tokens"] == "1000"
    assert raw.headers["x-ratelimit-reset-tokens"] == "0ms"
    assert not any(name.startswith("anthropic-ratelimit") for name in raw.headers)


def test_one_key_one_running_request(keyed):
    server, made, _ = keyed
    c = client(server, made["single"])
    started = threading.Event()
    finished = []

    def long_stream():
        with c.messages.stream(model="claude-sonnet-4-5", max_tokens=300, messages=[{"role": "user", "content": "go"}],
                               extra_body={"temperature": 1.0}) as stream:
            for _ in stream:
                started.set()
            finished.append(stream.get_final_message())

    worker = threading.Thread(target=long_stream)
    worker.start()
    assert started.wait(60)
    with pytest.raises(anthropic.RateLimitError):
        ask(c)
    worker.join(120)
    assert finished and ask(c).usage.output_tokens > 0  # the slot came back


def test_jwt_bearer_tokens_through_the_sdk(keyed):
    server, _, _ = keyed
    token = jwt.encode({"sub": "svc-a", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    c = anthropic.Anthropic(base_url=server.url, auth_token=token, api_key=None, max_retries=0)
    assert ask(c).usage.output_tokens > 0
    # Files belong to the token's subject.
    uploaded = c.beta.files.upload(file=("a.txt", b"hello", "text/plain"))
    other = jwt.encode({"sub": "svc-b", "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")
    with pytest.raises(anthropic.NotFoundError):
        anthropic.Anthropic(base_url=server.url, auth_token=other, max_retries=0).beta.files.retrieve_metadata(uploaded.id)
    expired = jwt.encode({"sub": "svc-a", "exp": int(time.time()) - 600}, SECRET, algorithm="HS256")
    with pytest.raises(anthropic.AuthenticationError) as raised:
        ask(anthropic.Anthropic(base_url=server.url, auth_token=expired, max_retries=0))
    assert "expired" in raised.value.message


def test_a_thread_is_continued_by_the_key_that_made_it_alone(keyed):
    server, made, _ = keyed
    owner, other = client(server, made["free"]), client(server, API_KEY)
    first = owner.beta.messages.create(model="claude-sonnet-4-5", max_tokens=4, system="the owner's system prompt",
                                       messages=[{"role": "user", "content": "hi"}], thread={"type": "create"})
    follow = dict(model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "and then?"}],
                  thread={"type": "continue", "previous_message_id": first.id})
    with pytest.raises(anthropic.NotFoundError) as stranger:  # as if there were no thread: an id tells nothing
        other.beta.messages.create(**follow)
    assert stranger.value.error_code == "thread_not_found"
    assert owner.beta.messages.create(**follow).usage.output_tokens > 0  # the stranger's try left it as it was


def test_the_response_cache_through_the_sdk(keyed):
    server, made, _ = keyed
    c = client(server, made["free"])
    kwargs = dict(max_tokens=10, messages=[{"role": "user", "content": "repeat after me"}], extra_body={"temperature": 0})
    first = c.messages.with_raw_response.create(model="claude-sonnet-4-5", **kwargs)
    assert first.headers["x-localvl-cache"] == "miss"
    with c.messages.stream(model="claude-sonnet-4-5", **kwargs) as stream:
        replayed = stream.get_final_message()
    original = first.parse()
    assert [b.text for b in replayed.content] == [b.text for b in original.content]
    assert replayed.usage.output_tokens == original.usage.output_tokens and replayed.id != original.id
    prompt = original.usage.input_tokens + original.usage.cache_read_input_tokens + original.usage.cache_creation_input_tokens
    # a hit computed nothing and wrote nothing to the prefix cache: the whole prompt reads as cached
    assert (replayed.usage.input_tokens, replayed.usage.cache_creation_input_tokens, replayed.usage.cache_read_input_tokens) == (0, 0, prompt)
    assert [b.text for b in ask(c, **kwargs).content] == [b.text for b in original.content]


def test_the_response_cache_through_the_openai_sdk(keyed):
    import openai

    server, made, _ = keyed
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=made["free"], max_retries=0)
    kwargs = dict(model="tiny-vl", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "openai repeat"}])
    first = c.chat.completions.with_raw_response.create(**kwargs)
    assert first.headers["x-localvl-cache"] == "miss"
    chunks = list(c.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    original = first.parse()
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (original.choices[0].message.content or "")
    assert chunks[-1].usage.completion_tokens == original.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == original.usage.prompt_tokens


def test_a_cached_tool_call_comes_back_with_an_id_of_its_own(keyed):
    import openai

    server, made, _ = keyed
    tool = {"name": "get_weather", "description": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    kwargs = dict(max_tokens=40, messages=[{"role": "user", "content": "weather?"}], tools=[tool],
                  tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0})
    c = client(server, made["free"])
    first, second = (c.messages.with_raw_response.create(model="claude-sonnet-4-5", **kwargs) for _ in range(2))
    assert (first.headers["x-localvl-cache"], second.headers["x-localvl-cache"]) == ("miss", "hit")
    calls = [[b for b in r.parse().content if b.type == "tool_use"] for r in (first, second)]
    assert calls[0] and [b.input for b in calls[0]] == [b.input for b in calls[1]]
    assert {b.id for b in calls[0]}.isdisjoint(b.id for b in calls[1])
    o = openai.OpenAI(base_url=server.url + "/v1", api_key=made["free"], max_retries=0)
    function = {"type": "function", "function": {"name": "get_weather", "parameters": tool["input_schema"]}}
    asked = dict(model="tiny-vl", max_tokens=40, temperature=0, messages=[{"role": "user", "content": "weather?"}], tools=[function],
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    answers = [o.chat.completions.create(**asked).choices[0].message.tool_calls for _ in range(2)]
    assert answers[0] and [c.function.arguments for c in answers[0]] == [c.function.arguments for c in answers[1]]
    assert {c.id for c in answers[0]}.isdisjoint(c.id for c in answers[1])


def test_a_client_that_leaves_mid_answer_is_charged_for_what_it_used(keyed, model_dir):
    # Tokens are charged from the answer's usage, which a client that leaves before the end never
    # gets: leaving just before it made every answer free of the token limits.
    import openai
    from transformers import AutoTokenizer

    server, made, _ = keyed
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=made["leaving"], max_retries=0)
    eos = AutoTokenizer.from_pretrained(model_dir("qwen2_5_vl")).convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    long = dict(model="tiny-vl", max_tokens=2000, n=2, logit_bias={str(token): -100 for token in eos},
                messages=[{"role": "user", "content": "word " * 200}])
    with c.chat.completions.create(**long, stream=True) as stream:
        next(iter(stream))  # the answer has begun: leave
    # Its prompt (200 tokens and more) put the key in debt against 60 a minute.
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="tiny-vl", max_tokens=1, messages=[{"role": "user", "content": "hi"}])


def test_an_unreachable_redis_lets_requests_through_unlimited_and_uncached(model_dir, tmp_path):
    # Nothing listens on this port: rate limits and the response cache both live in that Redis.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = Server(model_dir("qwen2_5_vl"), tmp_path / "dead-redis.log", "--redis-url", dead, "--rpm", "1",
                    "--api-key", "sk-dead-redis", "--response-cache", "8")
    try:
        c = client(server, "sk-dead-redis")
        answers = [c.messages.with_raw_response.create(model="claude-sonnet-4-5", max_tokens=3, extra_body={"temperature": 0},
                                                        messages=[{"role": "user", "content": "hi"}]) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]  # over --rpm 1: the limits were not checked
        assert all(a.headers["x-localvl-cache"] == "miss" for a in answers)  # nothing could be kept
        o = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-dead-redis", max_retries=0)
        reply = o.chat.completions.create(model="tiny-vl", max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        server.stop()


def test_two_servers_share_limits_and_answers_through_redis(model_dir, tmp_path):
    url = os.environ.get("LOCALVL_TEST_REDIS_URL")
    if not url:
        pytest.skip("no Redis server (set LOCALVL_TEST_REDIS_URL; .ci/run starts one)")
    key = "sk-shared-" + str(time.time_ns())
    servers = [Server(model_dir("qwen2_5_vl"), tmp_path / f"r{i}.log", "--redis-url", url, "--rpm", "5", "--api-key", key,
                      "--response-cache", "8") for i in range(2)]
    try:
        # An answer one server cached is served by the other.
        question = dict(max_tokens=6, messages=[{"role": "user", "content": f"shared {time.time_ns()}"}], extra_body={"temperature": 0})
        first = client(servers[0], key).messages.with_raw_response.create(model="claude-sonnet-4-5", **question)
        second = client(servers[1], key).messages.with_raw_response.create(model="claude-sonnet-4-5", **question)
        assert (first.headers["x-localvl-cache"], second.headers["x-localvl-cache"]) == ("miss", "hit")
        assert [b.text for b in first.parse().content] == [b.text for b in second.parse().content]
        answers = []
        for i in range(4):
            try:
                ask(client(servers[i % 2], key))
                answers.append(200)
            except anthropic.RateLimitError:
                answers.append(429)
        assert answers == [200, 200, 200, 429]  # five requests a minute across both servers
        with pytest.raises(anthropic.RateLimitError):
            ask(client(servers[0], key))
        assert httpx.get(servers[0].url + "/health").status_code == 200
    finally:
        for server in servers:
            server.stop()


def test_two_servers_sharing_redis_count_a_keys_running_requests_together(model_dir, tmp_path):
    url = os.environ.get("LOCALVL_TEST_REDIS_URL")
    if not url:
        pytest.skip("no Redis server (set LOCALVL_TEST_REDIS_URL; .ci/run starts one)")
    key = "sk-streams-" + str(time.time_ns())
    servers = [Server(model_dir("qwen2_5_vl"), tmp_path / f"s{i}.log", "--redis-url", url, "--max-streams-per-key", "1",
                      "--api-key", key) for i in range(2)]
    try:
        started, finished = threading.Event(), []

        def long_stream():
            with client(servers[0], key).messages.stream(
                    model="claude-sonnet-4-5", max_tokens=300, messages=[{"role": "user", "content": "go"}],
                    extra_body={"temperature": 1.0}) as stream:
                for _ in stream:
                    started.set()
                finished.append(stream.get_final_message())

        worker = threading.Thread(target=long_stream)
        worker.start()
        assert started.wait(60)
        with pytest.raises(anthropic.RateLimitError):  # the key's one running request is on the other server
            ask(client(servers[1], key))
        worker.join(120)
        retrying = anthropic.Anthropic(base_url=servers[1].url, api_key=key, max_retries=3)
        assert finished and ask(retrying).usage.output_tokens > 0  # the slot came back
    finally:
        for server in servers:
            server.stop()
