"""Reading a streamed answer (server-sent events, OpenAI's ``stream: true``): the one reader of
the local stack's demo, the bench, the load generator and the tests.

A stream is ``data: {json}`` events and ends with ``data: [DONE]``. An error after the stream
began (the status was already 200) is an event ``{"error": {...}}``, followed by ``[DONE]``.
:class:`EventStream` yields the answer's events, keeps an error event apart (``error``), and
says whether ``[DONE]`` ended the stream (``done``): a stream that stops without it was cut.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import Any


class StreamError(RuntimeError):
    """A stream that carried an error event, or ended without ``[DONE]``."""


class EventStream:
    """One stream's events, read line by line (bytes or text, as the HTTP client gives them)."""

    def __init__(self) -> None:
        self.done = False  # [DONE] ended it
        self.error: dict[str, Any] | None = None  # the error event's "error" object

    def feed(self, raw: bytes | str) -> dict[str, Any] | None:
        """One line: its event's JSON object, or None (not an answer's event: a blank line, a
        comment, ``[DONE]``, an error event). Raises ``ValueError`` on a data line that is
        not JSON."""
        line = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip()
        if not line.startswith("data:"):
            return None
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            self.done = True
            return None
        obj = json.loads(payload)
        if isinstance(obj, dict) and "error" in obj:
            self.error = obj["error"]
            return None
        return obj

    def events(self, lines: Iterable[bytes | str]) -> Iterator[dict[str, Any]]:
        """The answer's events from ``lines``, up to ``[DONE]``."""
        for raw in lines:
            obj = self.feed(raw)
            if obj is not None:
                yield obj
            if self.done:
                return

    async def aevents(self, lines: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
        """:meth:`events` over an asynchronous body (aiohttp's ``response.content``)."""
        async for raw in lines:
            obj = self.feed(raw)
            if obj is not None:
                yield obj
            if self.done:
                return

    @property
    def problem(self) -> str | None:
        """What went wrong, as a short code: ``stream:<code>`` for an error event (its code,
        else its type), ``incomplete`` for a stream without ``[DONE]``; None for a whole one."""
        if self.error is not None:
            return f"stream:{self.error.get('code') or self.error.get('type')}"
        return None if self.done else "incomplete"

    def check(self) -> None:
        """Raise :class:`StreamError` unless the stream was whole and error-free."""
        if self.error is not None:
            raise StreamError(f"{self.problem}: {self.error.get('message', '')}")
        if not self.done:
            raise StreamError("the stream ended without [DONE]")
