"""The Chat Completions SSE encoder on its own: chunk order and which chunks share a write."""

import asyncio
import json

from localvl.api.openai.stream import completion_chunks
from localvl.engine.events import Finished, TextDelta, Usage
from localvl.errors import OverloadedError
from tests.api.fake_stream import FakeStream


def writes(items, include_usage=True) -> list[list[object]]:
    """Each write's SSE payloads: the chunks as dicts, ``[DONE]`` as the string."""
    async def run():
        return [frame async for frame in completion_chunks([FakeStream(items)], "chatcmpl-1", "m", 0, include_usage, 10.0)]

    out = []
    for frame in asyncio.run(run()):
        text = frame.decode()
        assert text.endswith("\n\n")
        payloads = [line.removeprefix("data: ") for line in text.removesuffix("\n\n").split("\n\n")]
        out.append([p if p == "[DONE]" else json.loads(p) for p in payloads])
    return out


def test_the_usage_chunk_and_done_go_out_in_one_write():
    got = writes([TextDelta("Hel"), TextDelta("lo"), Finished("eos", Usage(7, 2))])
    assert [len(w) for w in got] == [1, 1, 1, 1, 2]
    assert got[0][0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [w[0]["choices"][0]["delta"]["content"] for w in got[1:3]] == ["Hel", "lo"]
    assert got[3][0]["choices"][0]["finish_reason"] == "stop"
    assert got[4][0]["usage"]["completion_tokens"] == 2 and got[4][1] == "[DONE]"
    assert all(w[0]["usage"] is None for w in got[:4])  # asked for, every chunk has the field: null until the last
    plain = writes([TextDelta("a"), Finished("eos", Usage(7, 1))], include_usage=False)
    assert plain[-1] == ["[DONE]"] and all("usage" not in w[0] for w in plain[:-1])


def test_a_failure_mid_stream_is_an_error_chunk_then_done():
    got = writes([TextDelta("a"), OverloadedError("busy")])
    assert got[-1][0]["error"]["message"] == "busy" and got[-1][1] == "[DONE]"


def test_the_usage_counts_the_tokens_spent_thinking():
    from localvl.api.openai.stream import usage_json

    done = [Finished("eos", Usage(7, 10, reasoning_tokens=6)), Finished("eos", Usage(7, 4, reasoning_tokens=3))]
    assert usage_json(done)["completion_tokens_details"] == {"reasoning_tokens": 9}
    assert usage_json(done)["completion_tokens"] == 14
