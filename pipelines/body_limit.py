"""Request bodies bounded by the service's limits, and refused so that clients see why.

:class:`BodyLimit` is pure ASGI middleware. Each request's limit comes from its path (the
JSON query endpoints get a smaller one, sized to the most queries a request may hold); a
declared ``Content-Length`` over it is refused before any byte is read, and every body,
chunked ones too, is counted as the app reads it and cut off the moment it passes.

A client that streams its body reads the answer only once it has sent everything; a server
that answers and closes at once makes it see a connection reset instead of the 413. So the
413 is sent whole first (with ``Connection: close``), and the rest of the body is then read
and thrown away, for at most :data:`DRAIN_SECONDS` and as many bytes again as the largest
legal body (never less than :data:`DRAIN_MIN_BYTES`), before the connection closes, as
web servers' "lingering close" does. Draining costs no parsing and holds nothing in memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

DRAIN_SECONDS = 5.0  # longest wait for the rest of a refused body
DRAIN_MIN_BYTES = 16 * 2**20  # most of a refused body read and dropped, at least

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class Limit:
    """A body limit: its size in bytes and how the 413 names it (the size and the option)."""

    bytes: int
    name: str

    def refusal(self, what: str) -> str:
        return f"{what} over the {self.bytes / 2**20:.3g} MB limit {self.name}."


class _BodyTooLarge(Exception):
    """Raised into the app when a request body passes the limit (the app never answers it)."""


class BodyLimit:
    """Pure ASGI middleware refusing request bodies over their path's limit with 413.

    Args:
        app: the wrapped ASGI app.
        default: the limit of every path not in ``by_path``.
        by_path: limits of particular paths (exact match).
    """

    def __init__(
        self, app: ASGIApp, *, default: Limit, by_path: dict[str, Limit] | None = None
    ) -> None:
        self.app, self.default, self.by_path = app, default, dict(by_path or {})
        self.drain_bytes = max(
            DRAIN_MIN_BYTES, default.bytes, *(x.bytes for x in self.by_path.values())
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.by_path.get(scope.get("path", ""), self.default)
        length = _content_length(scope)
        if length is not None and length > limit.bytes:
            rest = length if length <= self.drain_bytes else None  # too much: close at once
            await self._refuse(send, receive, limit.refusal(f"Request body of {length} bytes is"),
                               drain=rest)  # fmt: skip
            return
        received, over, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over:  # the app's own answer to a body cut short
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over and not started:
            what = f"Request body (more than {limit.bytes} bytes so far) is"
            await self._refuse(send, receive, limit.refusal(what), drain=self.drain_bytes)

    async def _refuse(
        self, send: Send, receive: Receive, detail: str, *, drain: int | None
    ) -> None:
        """Send the whole 413, drain up to ``drain`` more body bytes, then end the response
        (``Connection: close``: the server closes once it is complete)."""
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": drain is not None})
        if drain is not None:
            await _drain(receive, drain)
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive, most: int) -> None:
    """Read and drop the request body until it ends, ``most`` bytes or DRAIN_SECONDS pass."""
    loop = asyncio.get_running_loop()
    deadline, dropped = loop.time() + DRAIN_SECONDS, 0
    while dropped <= most:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
        except (asyncio.TimeoutError, OSError):
            return
        if message["type"] != "http.request":  # the client went away
            return
        dropped += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit():
            return int(value)
    return None
