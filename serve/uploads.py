"""Upload guards: the body-size limit (enforced while the body streams in) and the media type check.

:class:`UploadLimitMiddleware` is a small ASGI wrapper: it refuses a declared ``Content-Length`` over
the limit before the application reads anything, and otherwise counts bytes as ``receive`` hands them over,
stopping with 413 as soon as the count passes the limit (chunked uploads included). Nothing is buffered.

Every client gets to read its 413. A client that sent ``Expect: 100-continue`` (curl) is answered at once and
never sends the body. Most others (Python's ``urllib``, ``requests``, ``httpx``, browsers) send the whole body
before they read an answer; closing the connection on them with unread bytes makes the kernel reset it, and the
client sees "connection reset" instead of the 413. So the 413 is sent first (status, headers and its JSON body),
then the rest of the request body is read and thrown away chunk by chunk (a "lingering close", as nginx does),
and only then is the response ended. The discarding is bounded by ``drain_bytes`` (default 4x the limit) and
``drain_timeout_s``; a declared length beyond the bound is not drained at all (such a client gets the reset).

:func:`check_media` answers 415 for a declared content type that is not media, or for content that
is recognisably something else (PDF, ZIP/Office, executables, plain text...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.access import route_path


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once more than the allowed bytes arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the {_human(limit)} upload limit")


def _human(n: int) -> str:
    return f"{n / (1024 * 1024):g} MB" if n >= 1024 * 1024 else f"{n} bytes"


DRAIN_TIMEOUT_S = 30.0


class UploadLimitMiddleware:
    """Answer 413 for request bodies over ``max_bytes`` (or the path's own limit in ``path_limits``), checking
    while the body is read."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        drain_bytes: int | None = None,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        path_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes
        self.drain_timeout_s = drain_timeout_s
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.path_limits.get(route_path(scope), self.max_bytes)
        drain_bytes = 4 * max_bytes if self.drain_bytes is None else self.drain_bytes
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            drain = not _expects_continue(scope) and declared <= drain_bytes
            await _send_413(
                send, BodyTooLarge(max_bytes).detail, receive if drain else None, drain_bytes, self.drain_timeout_s
            )
            return

        received = 0
        started = False
        too_large = False

        async def limited_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    too_large = True
                    if message.get("more_body", False):  # read the rest away, so the client can read the 413
                        await _drain(receive, drain_bytes, self.drain_timeout_s)
                    raise BodyTooLarge(max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if too_large:  # the body was cut off: this connection cannot be reused
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside FastAPI's exception handling (e.g. a plain ASGI route)
            if started:
                raise
            await _send_413(send, exc.detail)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _expects_continue(scope: Scope) -> bool:
    return any(key == b"expect" and value.lower() == b"100-continue" for key, value in scope.get("headers", ()))


async def _drain(receive: Receive, limit: int, timeout_s: float) -> int:
    """Read and discard the request body until it ends, ``limit`` bytes or ``timeout_s``; returns bytes read."""
    drained = 0
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(TimeoutError):
        while drained <= limit:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
    return drained


async def _send_413(
    send: Send,
    detail: str,
    receive: Receive | None = None,
    drain_bytes: int = 0,
    drain_timeout_s: float = DRAIN_TIMEOUT_S,
) -> None:
    """Send the 413; with ``receive``, discard the unread body before ending the response (see the module doc)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    if receive is None:
        await send({"type": "http.response.body", "body": body})
        return
    await send({"type": "http.response.body", "body": body, "more_body": True})
    await _drain(receive, drain_bytes, drain_timeout_s)
    with contextlib.suppress(OSError, RuntimeError):  # the client may have gone meanwhile
        await send({"type": "http.response.body", "body": b""})


# ---- media type --------------------------------------------------------------------------------

ACCEPTED_TYPES: dict[str, tuple[str, ...]] = {
    "audio": ("audio/", "video/", "application/ogg"),
    "video": ("video/", "image/", "application/mp4"),
}
NEUTRAL_TYPES = ("", "application/octet-stream", "binary/octet-stream")
_NOT_MEDIA_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive or Office document"),
    (b"\xd0\xcf\x11\xe0", "an Office document"),
    (b"\x7fELF", "an executable"),
    (b"MZ", "an executable"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf", "a 7z archive"),
    (b"Rar!", "a RAR archive"),
    (b"{\\rtf", "an RTF document"),
)


class UnsupportedMedia(HTTPException):
    """415 with a reason."""

    def __init__(self, detail: str) -> None:
        super().__init__(415, detail)


def check_media(field: str, content_type: str | None, head: bytes) -> None:
    """Raise :class:`UnsupportedMedia` unless ``head`` (the first bytes) may be ``field`` media."""
    declared = (content_type or "").split(";", 1)[0].strip().lower()
    accepted = ACCEPTED_TYPES[field]
    if declared not in NEUTRAL_TYPES and not declared.startswith(accepted):
        wanted = ", ".join(t + ("*" if t.endswith("/") else "") for t in accepted)
        raise UnsupportedMedia(f"unsupported content type {declared!r} for {field} (expected {wanted})")
    for magic, what in _NOT_MEDIA_SIGNATURES:
        if head.startswith(magic):
            raise UnsupportedMedia(f"the {field} upload is {what}, not {field}")
    if looks_like_text(head):
        raise UnsupportedMedia(f"the {field} upload is text, not {field}")


def looks_like_text(head: bytes) -> bool:
    """True when ``head`` is (the start of) UTF-8 text: no NUL, decodable, nearly all printable."""
    if len(head) < 8 or b"\x00" in head:
        return False
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.97 * len(text)
