"""Server-held conversations (Anthropic's Threads beta, ``message-threads-2026-08-12``).

``thread: {type: create}`` asks the server to keep a conversation — its system prompt, tools and
messages, the reply included — under the reply's id; ``thread: {type: continue,
previous_message_id}`` sends only the new turn's messages, and the server puts the stored ones
(and the stored system prompt and tools) in front. The SDK's tool runner works this way by
default. Each reply can be continued once. State is kept in memory, bounded in count and age: a
thread that is gone is a 404 ``thread_not_found``, on which the SDK replays the whole conversation
under a new thread, so losing state (a restart, eviction) costs one replay, never an error the
client sees. A thread belongs to the key that made it, as files and batches do: another key's
continue finds nothing (a message id is no secret: it travels in logs and transcripts).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from localvl.errors import InvalidRequestError, NotFoundError

CREATE_ONLY = ("system", "tools")  # taken from the thread on a continue


@dataclass
class _Thread:
    owner: str  # the key (or JWT subject) whose request made it
    fields: dict[str, Any]  # system, tools as the create request sent them (JSON)
    messages: list[dict[str, Any]]  # the whole history, the reply included
    size: int  # bytes of the request and reply that made it, roughly what it holds
    created: float = field(default_factory=time.monotonic)
    continued: bool = False
    in_flight: bool = False


class ThreadStore:
    def __init__(self, max_bytes: int = 256 << 20, ttl_s: float = 6 * 3600) -> None:
        self._items: OrderedDict[str, _Thread] = OrderedDict()
        self._lock = threading.Lock()
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.bytes = 0

    def _get(self, message_id: str) -> _Thread | None:
        item = self._items.get(message_id)
        if item is not None and time.monotonic() - item.created > self.ttl_s:
            self._drop(message_id)
            return None
        return item

    def _drop(self, message_id: str) -> None:
        self.bytes -= self._items.pop(message_id).size

    def begin(self, body: dict[str, Any], owner: str) -> tuple[dict[str, Any], str | None]:
        """The full request a ``continue`` by ``owner`` stands for, and the id it continues (None for
        other requests).

        Raises the errors the SDK recovers from by replaying the conversation.
        """
        thread = body.get("thread")
        if not isinstance(thread, dict) or thread.get("type") != "continue":
            if isinstance(thread, dict) and thread.get("type") not in ("create", None):
                raise InvalidRequestError("thread.type: Input should be 'create' or 'continue'")
            return body, None
        previous = thread.get("previous_message_id")
        if not isinstance(previous, str):
            raise InvalidRequestError("thread.previous_message_id: Field required")
        with self._lock:
            item = self._get(previous)
            if item is None or item.owner != owner:
                raise NotFoundError(f"thread: no stored conversation for {previous}", code="thread_not_found")
            if item.in_flight:
                raise InvalidRequestError(
                    f"thread: another request is continuing from {previous}", code="thread_continue_in_flight"
                )
            if item.continued:
                raise InvalidRequestError(f"thread: {previous} was already continued", code="thread_already_continued")
            changed = [name for name in CREATE_ONLY if name in body and body[name] != item.fields.get(name)]
            if changed:
                raise InvalidRequestError(
                    "thread: " + ", ".join(changed) + " differ from the values stored with the thread",
                    code="thread_fingerprint_mismatch",
                )
            item.in_flight = True
            self._items.move_to_end(previous)
            messages = item.messages + list(body.get("messages") or [])
            fields = dict(item.fields)
        full = {**body, **fields, "messages": messages}
        full.pop("thread", None)
        return full, previous

    def end(self, previous: str | None, continued: bool) -> None:
        """A continue finished (``continued``: with a reply) or failed: the previous reply may be continued again."""
        if previous is None:
            return
        with self._lock:
            item = self._items.get(previous)
            if item is not None:
                item.in_flight = False
                item.continued = item.continued or continued

    def store(self, message_id: str, owner: str, body: dict[str, Any], reply: dict[str, Any], size: int) -> None:
        """Keep the conversation ``body`` (its full form) plus the assistant ``reply`` under ``message_id``,
        for ``owner`` alone to continue; ``size``: the bytes it came in (the oldest threads go first
        when the store holds too many)."""
        messages = list(body.get("messages") or [])
        if reply.get("content"):
            messages.append({"role": "assistant", "content": reply["content"]})
        fields = {name: body[name] for name in CREATE_ONLY if name in body}
        with self._lock:
            self._items[message_id] = _Thread(owner, fields, messages, size)
            self.bytes += size
            while self.bytes > self.max_bytes and len(self._items) > 1:
                self._drop(next(iter(self._items)))
