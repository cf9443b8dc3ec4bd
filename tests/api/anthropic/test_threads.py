"""Server-held conversations: what a continue stands for, and each way one is refused."""

import pytest

from localvl.api.anthropic.threads import ThreadStore
from localvl.errors import InvalidRequestError, NotFoundError

CREATE = {"model": "m", "max_tokens": 9, "system": "be brief", "tools": [{"name": "f", "input_schema": {"type": "object"}}],
          "thread": {"type": "create"}, "messages": [{"role": "user", "content": "hi"}]}
REPLY = {"content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]}
OWNER = "static-1234"
RESULT = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"}]}]


def continued(previous: str, **extra) -> dict:
    return {"model": "m", "max_tokens": 9, "thread": {"type": "continue", "previous_message_id": previous},
            "messages": RESULT, **extra}


def test_a_continue_stands_for_the_whole_conversation():
    store = ThreadStore()
    body, previous = store.begin(CREATE, OWNER)
    assert body is CREATE and previous is None
    store.store("msg_1", OWNER, CREATE, REPLY, size=100)
    full, previous = store.begin(continued("msg_1"), OWNER)
    assert previous == "msg_1" and "thread" not in full
    assert full["system"] == "be brief" and full["tools"] == CREATE["tools"] and full["max_tokens"] == 9
    assert full["messages"] == CREATE["messages"] + [{"role": "assistant", "content": REPLY["content"]}] + RESULT


def test_each_reply_is_continued_once_and_not_twice_at_a_time():
    store = ThreadStore()
    store.store("msg_1", OWNER, CREATE, REPLY, size=100)
    _, previous = store.begin(continued("msg_1"), OWNER)
    with pytest.raises(InvalidRequestError) as in_flight:
        store.begin(continued("msg_1"), OWNER)
    assert in_flight.value.code == "thread_continue_in_flight"
    store.end(previous, continued=False)  # that continue failed: it may be tried again
    _, previous = store.begin(continued("msg_1"), OWNER)
    store.end(previous, continued=True)
    with pytest.raises(InvalidRequestError) as again:
        store.begin(continued("msg_1"), OWNER)
    assert again.value.code == "thread_already_continued"


def test_unknown_expired_and_evicted_threads_are_not_found():
    store = ThreadStore(max_bytes=250, ttl_s=3600)
    with pytest.raises(NotFoundError) as missing:
        store.begin(continued("msg_nope"), OWNER)
    assert missing.value.code == "thread_not_found" and missing.value.status == 404
    for i in range(3):
        store.store(f"msg_{i}", OWNER, CREATE, REPLY, size=100)
    with pytest.raises(NotFoundError):  # the oldest went first
        store.begin(continued("msg_0"), OWNER)
    assert store.begin(continued("msg_2"), OWNER)[1] == "msg_2" and store.bytes <= 250
    store.ttl_s = 0
    with pytest.raises(NotFoundError):
        store.begin(continued("msg_1"), OWNER)


def test_create_only_fields_may_be_repeated_but_not_changed():
    store = ThreadStore()
    store.store("msg_1", OWNER, CREATE, REPLY, size=100)
    with pytest.raises(InvalidRequestError) as changed:
        store.begin(continued("msg_1", system="be verbose"), OWNER)
    assert changed.value.code == "thread_fingerprint_mismatch" and "system" in changed.value.message
    assert store.begin(continued("msg_1", system="be brief"), OWNER)[1] == "msg_1"


def test_only_the_key_that_made_a_thread_continues_it():
    store = ThreadStore()
    store.store("msg_1", OWNER, CREATE, REPLY, size=100)
    with pytest.raises(NotFoundError) as other:  # as if there were none: an id tells nothing
        store.begin(continued("msg_1"), "static-5678")
    assert other.value.code == "thread_not_found"
    assert store.begin(continued("msg_1"), OWNER)[1] == "msg_1"  # the other key's try left it as it was
